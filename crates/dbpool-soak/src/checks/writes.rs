//! The checkers over the status writes the audit log saw: fencing, force-reopen tokens and
//! breaker moves.
//!
//! Lives here: [`check_stale_writes`], [`check_tokens`], [`check_breaker_moves`]. Must not live
//! here: checkers over the world's resources (`world`).

use std::collections::{BTreeMap, BTreeSet};

use super::{Bounds, Violation};
use crate::history::{ActionKind, History, Scope, StatusWrite};

/// How much later than the operator's reaction a user action may be recorded, ms.
const ACTION_LAG_MS: i64 = 5_000;

fn pools_written(history: &History) -> BTreeSet<String> {
    history.writes.iter().map(|w| w.pool.clone()).collect()
}

fn slice(writes: &[&StatusWrite], at: usize) -> Vec<String> {
    let from = at.saturating_sub(4);
    let to = (at + 3).min(writes.len());
    writes[from..to].iter().map(|w| w.line()).collect()
}

/// No stale write: in etcd's commit order, a pool's accepted status writes never go back in
/// writerEpoch (after a new term's first write no older term's write lands), each term is
/// written by one identity only, and no accepted write lacks an epoch once one was written.
pub fn check_stale_writes(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    for pool in pools_written(history) {
        let writes = history.accepted_writes(&pool);
        let mut newest: Option<i64> = None;
        let mut owner: BTreeMap<i64, &str> = BTreeMap::new();
        for (i, w) in writes.iter().enumerate() {
            let problem = match (w.epoch, newest) {
                (None, Some(n)) => Some(format!(
                    "a write without writerEpoch by {} after term {n}",
                    w.user
                )),
                (Some(e), Some(n)) if e < n => Some(format!(
                    "a stale write: {} wrote term {e} after term {n}'s first write",
                    w.user
                )),
                (Some(e), _) => match owner.get(&e) {
                    Some(first) if *first != w.user => Some(format!(
                        "term {e} written by two identities: {first} and {}",
                        w.user
                    )),
                    _ => None,
                },
                (None, None) => None,
            };
            if let Some(message) = problem {
                out.push(Violation::new(
                    "stale-write",
                    &pool,
                    message,
                    slice(&writes, i),
                ));
            }
            if let Some(e) = w.epoch {
                owner.entry(e).or_insert(w.user.as_str());
                newest = Some(newest.map_or(e, |n| n.max(e)));
            }
        }
    }
    out
}

/// Every force-reopen token acted on exactly once: the pool's accepted writes show it in
/// status.lastForceReopen with one acting instant only. A token never acted on is excused only
/// when the pool was deleted or a newer token replaced it before the operator got to it; a token
/// nobody set must never appear.
pub fn check_tokens(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut issued: BTreeMap<(String, String), i64> = BTreeMap::new();
    for a in &history.actions {
        if let ActionKind::Token(token) = &a.kind {
            issued.insert((a.pool.clone(), token.clone()), a.time);
        }
    }
    let mut acted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for w in history.writes.iter().filter(|w| w.accepted()) {
        if let Some((token, at)) = &w.reopen {
            acted
                .entry((w.pool.clone(), token.clone()))
                .or_default()
                .insert(at.clone());
        }
    }
    for ((pool, token), times) in &acted {
        let lines = history
            .accepted_writes(pool)
            .iter()
            .filter(|w| w.reopen.as_ref().is_some_and(|(t, _)| t == token))
            .take(6)
            .map(|w| w.line())
            .collect::<Vec<_>>();
        if !issued.contains_key(&(pool.clone(), token.clone())) {
            out.push(Violation::new(
                "force-reopen-once",
                pool,
                format!("acted on token {token:?} that nobody set"),
                lines,
            ));
        } else if times.len() > 1 {
            out.push(Violation::new(
                "force-reopen-once",
                pool,
                format!("token {token:?} acted on {} times: {times:?}", times.len()),
                lines,
            ));
        }
    }
    for ((pool, token), at) in &issued {
        if acted.contains_key(&(pool.clone(), token.clone())) {
            continue;
        }
        let excused = history.actions.iter().any(|a| {
            a.pool == *pool
                && a.time >= *at
                && match &a.kind {
                    ActionKind::Delete => true,
                    ActionKind::Token(other) => other != token,
                    _ => false,
                }
        });
        if !excused {
            let lines = history
                .accepted_writes(pool)
                .iter()
                .filter(|w| w.time >= *at)
                .take(6)
                .map(|w| w.line())
                .collect();
            out.push(Violation::new(
                "force-reopen-once",
                pool,
                format!("token {token:?} set at {at} was never acted on"),
                lines,
            ));
        }
    }
    out
}

/// Every breaker move is explained. Each move to Open follows at least failureThreshold failures
/// (the lowest threshold in force shortly before) inside a fault window on the pool's target that
/// can fail a probe (widened by `explain_after_ms` for the write's delays); ForcedOpen and
/// Disabled are exempt by rule. No move to Closed while the target had been down for longer than
/// `closed_grace_ms` and still was (unless an operator or control-plane fault shortly before
/// may have delayed the write). Fleet-guard holds keep a breaker Closed (no move) and need no
/// excuse.
pub fn check_breaker_moves(history: &History, bounds: &Bounds) -> Vec<Violation> {
    let mut out = Vec::new();
    for pool in pools_written(history) {
        let Some(info) = history.pool(&pool) else {
            continue;
        };
        let writes = history.accepted_writes(&pool);
        let mut prev: Option<&str> = None;
        for (i, w) in writes.iter().enumerate() {
            let state = w.breaker.as_deref();
            let before = prev;
            prev = state;
            if state == before {
                continue;
            }
            let window_start = w.time - bounds.explain_after_ms;
            // An action is recorded once the apiserver answered the driver: the operator may act
            // on it a moment before.
            if history.mode_exempt(&pool, window_start, w.time + ACTION_LAG_MS) {
                continue;
            }
            let mut context = history.fault_lines(window_start, w.time);
            context.extend(slice(&writes, i));
            match state {
                Some("Open") => {
                    let explained = history
                        .faults_covering(&info.target, w.time, bounds.explain_after_ms)
                        .iter()
                        .any(|f| f.kind.fails_probes());
                    let threshold = history.min_threshold(&pool, window_start, w.time);
                    if !explained {
                        out.push(Violation::new(
                            "breaker-explained",
                            &pool,
                            format!("Open at {} with no fault on target {}", w.time, info.target),
                            context,
                        ));
                    } else if w.failures < threshold {
                        out.push(Violation::new(
                            "breaker-explained",
                            &pool,
                            format!(
                                "Open at {} after {} failures, threshold {threshold}",
                                w.time, w.failures
                            ),
                            context,
                        ));
                    }
                }
                Some("Closed") if matches!(before, Some("Open" | "HalfOpen")) => {
                    let delayed = history.faults.iter().any(|f| {
                        matches!(f.scope, Scope::Operator(_) | Scope::ControlPlane)
                            && f.start <= w.time
                            && f.end.is_none_or(|e| e >= window_start)
                    });
                    let down = history.faults.iter().any(|f| {
                        f.kind.target_down()
                            && f.covers(&info.target, w.time, 0)
                            && f.start <= w.time - bounds.closed_grace_ms
                    });
                    if down && !delayed {
                        out.push(Violation::new(
                            "breaker-explained",
                            &pool,
                            format!("Closed at {} while target {} was down", w.time, info.target),
                            context,
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    out
}
