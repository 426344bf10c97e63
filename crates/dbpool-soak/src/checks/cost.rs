//! The cost checker: the recorded events replayed through `dbpool-recovery`, and every
//! credentialed attempt the servers saw matched to one the replay allows.
//!
//! Lives here: [`soak_policy`] (the soak pools' recovery policy, as `dbpool-recovery` reads
//! it), [`replay_cost`] (the replay and the matching, per target) and [`check_cost`]. Must not
//! live here: the other checkers, reading logs, anything with a clock or a process.
//!
//! # The replay
//!
//! Every pool of the run (from its creation, or the nemesis's start for the pools that were there,
//! to its deletion or the end of the history) is driven through [`dbpool_recovery::apply`] with
//! its own policy, at the engine's own deadlines ([`dbpool_recovery::next_deadline`]), fed with
//! the recorded events:
//! - **user actions**: a token is `ForceReopen`; a mode, threshold, open timeout or interval edit
//!   changes the policy and is `SpecChanged` (a gate edit does not touch the probe);
//! - **connection losses**, each a `ProbeRequested` with the pool's connection gone: a kill,
//!   stop, restart or refusal of the target at its start, a black hole at its end (the proxy
//!   resets the sessions it swallowed), both edges of a Secret rotation (one of them re-keys the
//!   connection), and every term an operator process started (its log's `leadership: term
//!   started`: a new leader, or one that stood by a moment and leads again, probes from no
//!   connection; a history without the operators' logs takes each accepted write with a higher
//!   `writerEpoch`, placed `leader_lead_ms` before it);
//! - **readiness edges**: the end of every fault that kept the target from accepting is
//!   `ReadinessAccepting` (the ping sees the server accepting again: early trials);
//! - **probe results**, from the truth of the fault windows at the probe's instant: a kill, stop,
//!   restart, black hole or refusal fails it as an outage with no password sent; a full server
//!   fails it as an outage after the login (PostgreSQL authenticates before it refuses a
//!   session the superusers' reserved slots would take); added latency fails it as an outage
//!   (the upper side: a slow probe may time out); a Secret rotation fails it as a configuration
//!   error unless the pool still holds a connection (the session outlives the password change);
//!   anything else succeeds. A fault is in force from its start up to (not at) its end.
//!
//! A replayed probe **allows one credentialed attempt** when it runs the connect path and reaches
//! the server's authentication: the pool holds no connection (first probe, a failure or a loss
//! before it) or its connection is older than the prober's reconnect period, and no fault keeps
//! the server from authenticating. Each pool is replayed on its own: the operator shares one
//! connection per target and key and shares probe results, so it makes fewer attempts than the
//! replay allows, never more. The replay allows each pool at most what the engine's own schedule
//! lets it do; sharing is what the real operator saves.
//!
//! # The matching and its tolerance
//!
//! Per target, each credentialed attempt of the operator's role that PostgreSQL logged at or after
//! the nemesis's start is matched to a distinct allowed attempt at most `cost_early_ms` after it
//! and at most `cost_late_ms` before it (greedy in time order, which is optimal for windows of one
//! length). An attempt with no match is **unexplained**: the checker fails, naming it. The
//! tolerance is for what the replay cannot know: the driver records a fault's edges a little
//! before or after the proxy or server changed (early), and the operator acts later than the
//! replay's instants: its reconcile queue and write budget on a loaded 2-core machine, a login of
//! three round trips under added latency (up to 1.5 s each) and a 2 s timeout (late). So the
//! checker catches a retry storm, a probe loop, an attempt with no event to explain it or more
//! attempts than the engine's schedule allows around one; it cannot tell one attempt shifted by a
//! few seconds from another.

use std::{collections::BTreeMap, time::Duration};

use dbpool_recovery::{BreakerMode, Event, FailureKind, Policy, PoolState, apply, next_deadline};
use jiff::Timestamp;

use super::{Bounds, Violation};
use crate::history::{ActionKind, Fault, FaultKind, History, Ms, Scope};

/// The soak pools' recovery policy (the binary's `world::policy()` writes the same values into
/// every DbPool's spec): interval 3s, timeout 2s, backoff 300ms ×2 up to 2s without jitter, 10
/// attempts then a 10s cooldown, open after 3 outage failures for 2s, close after 1 success,
/// early trials on.
pub fn soak_policy() -> Policy {
    Policy {
        interval: Duration::from_secs(3),
        timeout: Duration::from_secs(2),
        initial_delay: Duration::from_millis(300),
        multiplier: 2.0,
        max_delay: Duration::from_secs(2),
        max_attempts: 10,
        cooldown: Duration::from_secs(10),
        jitter: 0.0,
        failure_threshold: 3,
        open_timeout: Duration::from_secs(2),
        success_threshold: 1,
        mode: BreakerMode::Auto,
        early_trial: true,
    }
}

/// One target's verdict material: the attempts seen, those the replay allows, and the ones no
/// allowed attempt explains.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetCost {
    /// The target's name.
    pub target: String,
    /// Credentialed attempts of the operator's role PostgreSQL logged since the nemesis began.
    pub seen: usize,
    /// Credentialed attempts the replay allows (pools replayed one by one).
    pub allowed: usize,
    /// The seen attempts no allowed one explains (their instants).
    pub unexplained: Vec<Ms>,
    /// The largest lag of a seen attempt after the latest allowed instant it may match
    /// (matching aside): the smallest late tolerance the attempts could live with, ms.
    pub max_lag_ms: Option<Ms>,
}

/// What happens to a replayed pool at an instant.
#[derive(Clone, Debug)]
enum Input {
    /// A user action: the engine event and the policy after it.
    Spec(Policy, Event),
    /// The connection is gone and a probe is wanted.
    Loss,
    /// The target accepts connections again.
    Ready,
}

/// Whether `kind` keeps the server from authenticating anyone (no password reaches it). A full
/// server is not one: PostgreSQL authenticates (and logs the login) before it refuses a session
/// the slots reserved for superusers would have to take.
fn blocks_auth(kind: FaultKind) -> bool {
    matches!(
        kind,
        FaultKind::DbKill
            | FaultKind::DbStop
            | FaultKind::DbRestart
            | FaultKind::BlackHole
            | FaultKind::Refuse
    )
}

/// Whether `kind` fails a probe as an outage.
fn fails_as_outage(kind: FaultKind) -> bool {
    blocks_auth(kind) || matches!(kind, FaultKind::Latency | FaultKind::MaxConnections)
}

/// The instants at which operator processes started a term: from the operators' logs
/// (`history.terms`), or, for a history recorded without them, each accepted write with a higher
/// `writerEpoch` than any before it (etcd's commit order) moved `lead_ms` earlier.
fn new_terms(history: &History, lead_ms: Ms) -> Vec<Ms> {
    if !history.terms.is_empty() {
        return history.terms.iter().map(|t| t.time).collect();
    }
    let mut writes: Vec<_> = history.writes.iter().filter(|w| w.accepted()).collect();
    writes.sort_by_key(|w| (w.rv, w.time));
    let mut highest = None;
    let mut out = Vec::new();
    for w in writes {
        if let Some(epoch) = w.epoch
            && highest.is_none_or(|h| epoch > h)
        {
            if highest.is_some() {
                out.push(w.time - lead_ms);
            }
            highest = Some(epoch);
        }
    }
    out
}

/// The policy after `kind` on `policy`, with its engine event (None: not a recovery input).
fn spec_input(policy: &Policy, kind: &ActionKind) -> Option<Input> {
    let mut p = *policy;
    let parse = |s: &str| parse_duration(s).unwrap_or(Duration::from_secs(1));
    match kind {
        ActionKind::Token(_) => return Some(Input::Spec(p, Event::ForceReopen)),
        ActionKind::Mode(m) => {
            p.mode = match m.as_str() {
                "ForcedOpen" => BreakerMode::ForcedOpen,
                "Disabled" => BreakerMode::Disabled,
                _ => BreakerMode::Auto,
            }
        }
        ActionKind::Threshold(n) => p.failure_threshold = (*n).max(1) as u32,
        ActionKind::OpenTimeout(s) => p.open_timeout = parse(s),
        ActionKind::Interval(s) => p.interval = parse(s),
        ActionKind::Create | ActionKind::Delete | ActionKind::Gate(_) => return None,
    }
    Some(Input::Spec(p.clamped(), Event::SpecChanged))
}

/// `300ms`, `2s`, `1m` (the forms the soak writes).
fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(60 * n)),
        _ => None,
    }
}

/// The inputs of one pool on `target` in time order, with its life span.
fn pool_inputs(history: &History, pool: &str, target: &str, terms: &[Ms]) -> Vec<(Ms, Input)> {
    let mut inputs = Vec::new();
    let mut policy = soak_policy();
    if let Some(info) = history.pool(pool) {
        policy.failure_threshold = info.threshold.max(1) as u32;
    }
    let mut actions: Vec<_> = history.actions.iter().filter(|a| a.pool == pool).collect();
    actions.sort_by_key(|a| a.time);
    for a in actions {
        if let Some(input) = spec_input(&policy, &a.kind) {
            if let Input::Spec(p, _) = &input {
                policy = *p;
            }
            inputs.push((a.time, input));
        }
    }
    for f in &history.faults {
        if !matches!(&f.scope, Scope::Target(t) if t == target) {
            continue;
        }
        let end = f.end.unwrap_or(Ms::MAX);
        match f.kind {
            FaultKind::DbKill | FaultKind::DbStop | FaultKind::DbRestart | FaultKind::Refuse => {
                inputs.push((f.start, Input::Loss))
            }
            FaultKind::BlackHole => inputs.push((end, Input::Loss)),
            FaultKind::SecretRotation => {
                inputs.push((f.start, Input::Loss));
                inputs.push((end, Input::Loss));
            }
            _ => {}
        }
        if blocks_auth(f.kind) || f.kind == FaultKind::MaxConnections {
            inputs.push((end, Input::Ready));
        }
    }
    inputs.extend(terms.iter().map(|t| (*t, Input::Loss)));
    // At one instant: the policy first, then losses, then readiness.
    inputs.sort_by_key(|(t, i)| (*t, matches!(i, Input::Ready) as u8));
    inputs
}

fn ts(ms: Ms) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn ms(t: Timestamp) -> Ms {
    t.as_millisecond()
}

/// One pool's replay: its probes, and which of them allow a credentialed attempt.
struct PoolReplay<'h> {
    /// The faults on the pool's target.
    faults: Vec<&'h Fault>,
    reconnect_ms: Ms,
    state: PoolState,
    policy: Policy,
    /// Since when the pool holds a connection (None: none).
    connected: Option<Ms>,
    allowed: Vec<Ms>,
}

impl PoolReplay<'_> {
    /// Whether a fault on the target is in force at `t` (from its start, up to its end) and
    /// matches `pick`.
    fn fault_at(&self, t: Ms, pick: impl Fn(FaultKind) -> bool) -> bool {
        self.faults
            .iter()
            .any(|f| pick(f.kind) && f.start <= t && f.end.is_none_or(|end| t < end))
    }

    /// A probe at `t`: its result from the truth, and whether it allows an attempt.
    fn probe(&mut self, t: Ms) {
        let now = ts(t);
        self.state = apply(&self.state, Event::ProbeStarted, now, &self.policy).0;
        let seq = self.state.probe_seq;
        let fresh = self
            .connected
            .is_none_or(|since| t - since >= self.reconnect_ms);
        let blocked = self.fault_at(t, blocks_auth);
        if fresh && !blocked {
            self.allowed.push(t);
        }
        let rotation = self.fault_at(t, |k| k == FaultKind::SecretRotation);
        let outage = self.fault_at(t, fails_as_outage);
        let kind = if outage {
            Some(FailureKind::Outage)
        } else if rotation && fresh {
            Some(FailureKind::Config)
        } else {
            None
        };
        let event = match kind {
            Some(kind) => {
                self.connected = None;
                Event::ProbeFailed { seq, kind }
            }
            None => {
                if fresh {
                    self.connected = Some(t);
                }
                Event::ProbeSucceeded {
                    seq,
                    degraded: false,
                }
            }
        };
        self.state = apply(&self.state, event, now, &self.policy).0;
    }

    fn input(&mut self, t: Ms, input: Input) {
        let now = ts(t);
        let event = match input {
            Input::Spec(policy, event) => {
                self.policy = policy;
                event
            }
            Input::Loss => {
                self.connected = None;
                Event::ProbeRequested
            }
            Input::Ready => Event::ReadinessAccepting,
        };
        self.state = apply(&self.state, event, now, &self.policy).0;
    }

    /// Runs the pool from `from` to `to` through `inputs`, probing at the engine's deadlines.
    fn run(&mut self, from: Ms, to: Ms, inputs: Vec<(Ms, Input)>) {
        let mut inputs = inputs.into_iter().filter(|(t, _)| *t >= from).peekable();
        let mut now = from;
        let mut last_probe = Ms::MIN;
        // Bounded: a probe is at least the engine's smallest duration after the last.
        let min_step = dbpool_recovery::MIN_DURATION.as_millis() as Ms;
        loop {
            let due = next_deadline(&self.state, &self.policy).map_or(now, ms);
            let due = due.max(now).max(last_probe.saturating_add(min_step));
            let next_input = inputs.peek().map_or(Ms::MAX, |(t, _)| *t);
            if due.min(next_input) > to {
                break;
            }
            if due <= next_input {
                self.probe(due);
                now = due;
                last_probe = due;
            } else if let Some((t, input)) = inputs.next() {
                now = t;
                self.input(t, input);
            }
        }
    }
}

/// The replay's allowed attempts on every target (pools one by one), as instants.
fn allowed_attempts(history: &History, bounds: &Bounds, end: Ms) -> BTreeMap<String, Vec<Ms>> {
    let terms = new_terms(history, bounds.leader_lead_ms);
    let mut out: BTreeMap<String, Vec<Ms>> = BTreeMap::new();
    for pool in history.pools.iter().filter(|p| !p.isolated) {
        let created = history
            .actions
            .iter()
            .find(|a| a.pool == pool.key && a.kind == ActionKind::Create)
            .map(|a| a.time);
        let deleted = history
            .actions
            .iter()
            .find(|a| a.pool == pool.key && a.kind == ActionKind::Delete)
            .map_or(end, |a| a.time);
        let mut replay = PoolReplay {
            faults: history
                .faults
                .iter()
                .filter(|f| matches!(&f.scope, Scope::Target(t) if *t == pool.target))
                .collect(),
            reconnect_ms: bounds.reconnect_ms,
            state: PoolState::new(0),
            policy: soak_policy(),
            connected: None,
            allowed: Vec::new(),
        };
        replay.policy.failure_threshold = pool.threshold.max(1) as u32;
        let from = match created {
            Some(t) => t,
            None => {
                // There at the start, healthy, on the connection its target's last login opened.
                let opened = history
                    .attempts
                    .iter()
                    .filter(|a| a.target == pool.target && a.time <= history.start)
                    .map(|a| a.time)
                    .max();
                replay.connected = Some(opened.unwrap_or(history.start));
                replay.probe(history.start);
                replay.allowed.clear();
                history.start
            }
        };
        let inputs = pool_inputs(history, &pool.key, &pool.target, &terms);
        replay.run(from, deleted, inputs);
        out.entry(pool.target.clone())
            .or_default()
            .extend(replay.allowed);
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Each target's attempts seen, allowed by the replay, and unexplained (see the module docs).
pub fn replay_cost(history: &History, bounds: &Bounds) -> Vec<TargetCost> {
    let mut seen: BTreeMap<String, Vec<Ms>> = BTreeMap::new();
    for a in history
        .attempts
        .iter()
        .filter(|a| a.user == "app" && a.db == "app" && a.time >= history.start)
    {
        seen.entry(a.target.clone()).or_default().push(a.time);
    }
    let end = seen
        .values()
        .flatten()
        .copied()
        .max()
        .unwrap_or(history.last_fault_end)
        .max(history.last_fault_end);
    let allowed = allowed_attempts(history, bounds, end);
    let mut targets: Vec<String> = seen.keys().chain(allowed.keys()).cloned().collect();
    targets.sort();
    targets.dedup();
    targets
        .into_iter()
        .map(|target| {
            let mut real = seen.get(&target).cloned().unwrap_or_default();
            real.sort_unstable();
            let slots = allowed.get(&target).cloned().unwrap_or_default();
            let (unexplained, max_lag_ms) =
                unmatched(&real, &slots, bounds.cost_early_ms, bounds.cost_late_ms);
            TargetCost {
                target,
                seen: real.len(),
                allowed: slots.len(),
                unexplained,
                max_lag_ms,
            }
        })
        .collect()
}

/// The instants of `real` (sorted) not matched one to one to an instant `a` of `slots` (sorted)
/// with `a - early ≤ r ≤ a + late`; greedy, earliest slot first. Also the largest lag of an
/// attempt after the latest slot it could match (one to one aside).
fn unmatched(real: &[Ms], slots: &[Ms], early: Ms, late: Ms) -> (Vec<Ms>, Option<Ms>) {
    let mut out = Vec::new();
    let lag = real
        .iter()
        .filter_map(|&r| {
            let i = slots.partition_point(|&a| a - early <= r);
            i.checked_sub(1).map(|i| r - slots[i])
        })
        .max();
    let mut next = 0;
    for &r in real {
        while next < slots.len() && slots[next] + late < r {
            next += 1;
        }
        if next < slots.len() && slots[next] - early <= r {
            next += 1;
        } else {
            out.push(r);
        }
    }
    (out, lag)
}

/// Cost: every credentialed attempt of the operator's role is one the replay allows (within the
/// stated tolerance).
pub fn check_cost(history: &History, bounds: &Bounds) -> Vec<Violation> {
    let mut out = Vec::new();
    for cost in replay_cost(history, bounds) {
        let Some(first) = cost.unexplained.first() else {
            continue;
        };
        let mut slice: Vec<String> = cost
            .unexplained
            .iter()
            .take(10)
            .map(|t| format!("{t} credentialed attempt on {} unexplained", cost.target))
            .collect();
        slice.extend(history.fault_lines(first - 30_000, first + 5_000));
        out.push(Violation::new(
            "cost",
            &cost.target,
            format!(
                "{} of {} credentialed attempts not allowed by the replay (it allows {}; \
                 tolerance {} ms early, {} ms late)",
                cost.unexplained.len(),
                cost.seen,
                cost.allowed,
                bounds.cost_early_ms,
                bounds.cost_late_ms
            ),
            slice,
        ));
    }
    out
}
