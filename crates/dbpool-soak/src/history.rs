//! What a soak run records: the history the checkers judge.
//!
//! Lives here: the record types ([`History`] and its parts) and the small questions every checker
//! asks of them (which faults touched a target at an instant, which breaker mode was in force).
//! Every instant is milliseconds since the Unix epoch ([`Ms`]) on the host clock, which the
//! apiserver's audit log and PostgreSQL's log use too. Must not live here: judging (the
//! `checks`), reading logs (`audit`, `pglog`), or running anything.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Ms = i64;

/// What a fault touches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One database target (its server, its proxy, its role's password), by name.
    Target(String),
    /// One operator replica, by identity.
    Operator(String),
    /// The apiserver and etcd.
    ControlPlane,
}

/// The kinds of injected fault.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The postmaster SIGKILLed, started again at the window's end.
    DbKill,
    /// A fast shutdown, started again at the window's end.
    DbStop,
    /// A fast shutdown and an immediate start (the window is the restart).
    DbRestart,
    /// The proxy swallows everything.
    BlackHole,
    /// The proxy refuses connects and resets live connections.
    Refuse,
    /// The proxy delays every chunk.
    Latency,
    /// Other sessions take every free connection slot.
    MaxConnections,
    /// The role's password and the Secrets disagree (a rotation in progress).
    SecretRotation,
    /// The apiserver stopped and started again on its port.
    ApiserverRestart,
    /// etcd SIGSTOPped, then SIGCONTed.
    EtcdFreeze,
    /// The leader SIGKILLed; a replacement with its identity starts at the window's end.
    LeaderKill,
    /// The leader SIGSTOPped past its lease, then SIGCONTed.
    LeaderStop,
    /// One replica's apiserver connection black-holed (a proxy per replica).
    OperatorCut,
}

impl FaultKind {
    /// Every kind, for reports.
    pub const ALL: [FaultKind; 13] = [
        FaultKind::DbKill,
        FaultKind::DbStop,
        FaultKind::DbRestart,
        FaultKind::BlackHole,
        FaultKind::Refuse,
        FaultKind::Latency,
        FaultKind::MaxConnections,
        FaultKind::SecretRotation,
        FaultKind::ApiserverRestart,
        FaultKind::EtcdFreeze,
        FaultKind::LeaderKill,
        FaultKind::LeaderStop,
        FaultKind::OperatorCut,
    ];

    /// Whether the fault can make a probe of its target fail (and so explain an Open).
    pub fn fails_probes(self) -> bool {
        matches!(
            self,
            FaultKind::DbKill
                | FaultKind::DbStop
                | FaultKind::DbRestart
                | FaultKind::BlackHole
                | FaultKind::Refuse
                | FaultKind::Latency
                | FaultKind::MaxConnections
                | FaultKind::SecretRotation
        )
    }

    /// Whether the target cannot serve anyone during the fault (a breaker must not close then).
    pub fn target_down(self) -> bool {
        matches!(
            self,
            FaultKind::DbKill | FaultKind::DbStop | FaultKind::BlackHole | FaultKind::Refuse
        )
    }
}

/// One injected fault.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Fault {
    /// What was done.
    pub kind: FaultKind,
    /// To what.
    pub scope: Scope,
    /// When it began.
    pub start: Ms,
    /// When it was undone (None: never, a defect of the driver the checkers report).
    pub end: Option<Ms>,
    /// Parameters, for people (a delay, a signal, the order of a rotation).
    pub detail: String,
}

impl Fault {
    /// Whether the fault is on `target` and its window, widened by `after` ms past its end,
    /// contains `t`.
    pub fn covers(&self, target: &str, t: Ms, after: Ms) -> bool {
        matches!(&self.scope, Scope::Target(x) if x == target)
            && self.start <= t
            && self.end.is_none_or(|end| t <= end + after)
    }
}

/// Something a user does to a pool (not a fault: the operator must follow it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum ActionKind {
    /// The pool was created.
    Create,
    /// The pool was deleted.
    Delete,
    /// A force-reopen token was set (the annotation's value).
    Token(String),
    /// `spec.breaker.mode` was set.
    Mode(String),
    /// `spec.breaker.failureThreshold` was set.
    Threshold(i32),
    /// `spec.breaker.openTimeout` was set.
    OpenTimeout(String),
    /// `spec.healthCheck.interval` was set.
    Interval(String),
    /// `spec.gate` was set (true) or removed (false).
    Gate(bool),
}

/// One user action on one pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Action {
    /// `namespace/name`.
    pub pool: String,
    /// When the apiserver accepted it.
    pub time: Ms,
    /// What.
    pub kind: ActionKind,
}

/// A pool of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PoolInfo {
    /// `namespace/name`.
    pub key: String,
    /// The target it points at.
    pub target: String,
    /// `spec.breaker.failureThreshold` at creation.
    pub threshold: i32,
    /// Its host is not one its Secret allows: the operator must never log in for it.
    pub isolated: bool,
}

/// One status write the apiserver's audit log saw (dbpools/status, ResponseComplete).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StatusWrite {
    /// When the apiserver received the request.
    pub time: Ms,
    /// Who wrote (the authenticated user: one per operator replica).
    pub user: String,
    /// `namespace/name`.
    pub pool: String,
    /// The HTTP status code of the answer.
    pub code: u16,
    /// metadata.resourceVersion of the stored object (etcd's commit order; accepted writes).
    pub rv: u64,
    /// status.writerEpoch of the object as stored (accepted writes only).
    pub epoch: Option<i64>,
    /// status.breaker.state.
    pub breaker: Option<String>,
    /// status.breaker.openCount.
    pub open_count: i64,
    /// status.consecutiveFailures.
    pub failures: i32,
    /// status.phase.
    pub phase: Option<String>,
    /// status.lastForceReopen as (token, time).
    pub reopen: Option<(String, String)>,
}

impl StatusWrite {
    /// Whether the apiserver accepted the write.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// One line for a failure's history slice.
    pub fn line(&self) -> String {
        format!(
            "{} write {} by {} code={} epoch={:?} breaker={:?} openCount={} failures={} phase={:?} reopen={:?}",
            self.time,
            self.pool,
            self.user,
            self.code,
            self.epoch,
            self.breaker,
            self.open_count,
            self.failures,
            self.phase,
            self.reopen
        )
    }
}

/// One credentialed login attempt PostgreSQL logged (authorized or failed authentication).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Attempt {
    /// When the server logged it.
    pub time: Ms,
    /// The target's name.
    pub target: String,
    /// The role that tried.
    pub user: String,
    /// The database asked for.
    pub db: String,
    /// Authorized (true) or authentication failed (false).
    pub ok: bool,
}

/// A term an operator process started (its log's `leadership: term started`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Term {
    /// When the process logged it.
    pub time: Ms,
    /// The process's leader-election identity.
    pub identity: String,
    /// The term's writer epoch.
    pub epoch: i64,
}

/// One sample of a resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Sample {
    /// When.
    pub time: Ms,
    /// `rss_kib`, `fds`, `sessions` or `series`.
    pub what: String,
    /// Of what: a process (`op-1#2`: identity and incarnation) or a target.
    pub subject: String,
    /// The value.
    pub value: f64,
}

/// Where a pool ended up after the last fault.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Convergence {
    /// `namespace/name`.
    pub pool: String,
    /// What the truth says it must show (e.g. `Healthy/Closed`).
    pub expected: String,
    /// What it showed last.
    pub observed: String,
    /// When it first showed the expected state after the last fault ended.
    pub at: Option<Ms>,
    /// The stated bound, ms after the last fault's end.
    pub bound_ms: i64,
}

/// Resource counts at the baseline and at the end, for the leak checker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Leaks {
    /// The operator's sessions per target once every pool was healthy at the start.
    pub baseline_sessions: Vec<(String, i64)>,
    /// The same after convergence at the end.
    pub final_sessions: Vec<(String, i64)>,
    /// Open fds of the leader at the baseline and at the end.
    pub fds: Option<(f64, f64)>,
    /// Pool-labelled metric series per live pool at the baseline and at the end.
    pub series_per_pool: Option<(f64, f64)>,
    /// Deleted pools the leader still exports a series of at the end.
    pub deleted_with_series: Vec<String>,
}

/// A whole run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct History {
    /// The nemesis seed.
    pub seed: u64,
    /// When the nemesis started.
    pub start: Ms,
    /// When the last fault ended.
    pub last_fault_end: Ms,
    /// Every pool of the run.
    pub pools: Vec<PoolInfo>,
    /// Every injected fault.
    pub faults: Vec<Fault>,
    /// Every user action.
    pub actions: Vec<Action>,
    /// Every status write the audit log saw.
    pub writes: Vec<StatusWrite>,
    /// Every credentialed login attempt PostgreSQL logged.
    pub attempts: Vec<Attempt>,
    /// Resource samples.
    pub samples: Vec<Sample>,
    /// Where each pool ended up.
    pub convergence: Vec<Convergence>,
    /// Baseline and final resource counts.
    pub leaks: Leaks,
    /// Events (reason, pool, reporting user) the audit log saw.
    pub events: Vec<(Ms, String, String, String)>,
    /// Every term an operator process started, from the operators' logs (absent from histories
    /// recorded before it was kept).
    #[serde(default)]
    pub terms: Vec<Term>,
}

impl History {
    /// The pool `key`, if the run had it.
    pub fn pool(&self, key: &str) -> Option<&PoolInfo> {
        self.pools.iter().find(|p| p.key == key)
    }

    /// The accepted status writes of `pool`, in etcd's commit order (resourceVersion).
    pub fn accepted_writes(&self, pool: &str) -> Vec<&StatusWrite> {
        let mut out: Vec<&StatusWrite> = self
            .writes
            .iter()
            .filter(|w| w.pool == pool && w.accepted())
            .collect();
        out.sort_by_key(|w| (w.rv, w.time));
        out
    }

    /// The breaker mode in force on `pool` at `t` (the last Mode action at or before it).
    pub fn mode_at(&self, pool: &str, t: Ms) -> String {
        self.actions
            .iter()
            .filter(|a| a.pool == pool && a.time <= t)
            .filter_map(|a| match &a.kind {
                ActionKind::Mode(m) => Some((a.time, m.clone())),
                _ => None,
            })
            .max_by_key(|(time, _)| *time)
            .map_or_else(|| "Auto".to_owned(), |(_, m)| m)
    }

    /// Whether `pool` was ForcedOpen or Disabled at any instant of `[from, to]`.
    pub fn mode_exempt(&self, pool: &str, from: Ms, to: Ms) -> bool {
        let forced = |m: &str| m == "ForcedOpen" || m == "Disabled";
        forced(&self.mode_at(pool, from))
            || self.actions.iter().any(|a| {
                a.pool == pool
                    && (from..=to).contains(&a.time)
                    && matches!(&a.kind, ActionKind::Mode(m) if forced(m))
            })
    }

    /// The lowest failureThreshold in force on `pool` at any instant of `[from, to]`.
    pub fn min_threshold(&self, pool: &str, from: Ms, to: Ms) -> i32 {
        let initial = self.pool(pool).map_or(1, |p| p.threshold);
        let mut at_from = initial;
        let mut lowest = i32::MAX;
        for a in self.actions.iter().filter(|a| a.pool == pool) {
            if let ActionKind::Threshold(n) = a.kind {
                if a.time <= from {
                    at_from = n;
                } else if a.time <= to {
                    lowest = lowest.min(n);
                }
            }
        }
        at_from.min(lowest)
    }

    /// The faults on `target` whose window (widened by `after` ms) contains `t`.
    pub fn faults_covering(&self, target: &str, t: Ms, after: Ms) -> Vec<&Fault> {
        self.faults
            .iter()
            .filter(|f| f.covers(target, t, after))
            .collect()
    }

    /// The faults that overlap `[from, to]`, as lines for a failure's slice.
    pub fn fault_lines(&self, from: Ms, to: Ms) -> Vec<String> {
        self.faults
            .iter()
            .filter(|f| f.start <= to && f.end.is_none_or(|e| e >= from))
            .map(|f| {
                format!(
                    "{} fault {:?} on {:?} until {:?} ({})",
                    f.start, f.kind, f.scope, f.end, f.detail
                )
            })
            .collect()
    }
}
