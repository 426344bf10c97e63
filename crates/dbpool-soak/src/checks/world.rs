//! The checkers over the world's resources: convergence, cost, leaks, passwords, isolation.
//!
//! Lives here: [`check_convergence`], [`check_leaks`], [`check_passwords`], [`check_isolation`].
//! Must not live here: checkers over status writes (`writes`), the cost replay (`cost`).

use std::collections::BTreeMap;

use super::{Bounds, ISOLATED_DB, Violation};
use crate::history::{History, Ms};

/// Convergence: every fault was undone, and after the last fault ended every pool showed what
/// the truth says (server up, credentials right, spec applied: Healthy and Closed; an isolated
/// pool ConfigError) within its stated bound.
pub fn check_convergence(history: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    for f in history.faults.iter().filter(|f| f.end.is_none()) {
        out.push(Violation::new(
            "convergence",
            &format!("{:?}", f.scope),
            format!("fault {:?} begun at {} was never undone", f.kind, f.start),
            vec![],
        ));
    }
    for c in &history.convergence {
        let lines = vec![format!(
            "last fault ended {}; expected {}, observed {}, at {:?}, bound {} ms",
            history.last_fault_end, c.expected, c.observed, c.at, c.bound_ms
        )];
        // A pool the last accepted edit left ForcedOpen shows Open: that is the spec applied.
        let forced = history.mode_at(&c.pool, Ms::MAX) == "ForcedOpen"
            && c.observed.starts_with("BreakerOpen/Open");
        match c.at {
            _ if forced => {}
            None => out.push(Violation::new(
                "convergence",
                &c.pool,
                format!("never showed {} (last: {})", c.expected, c.observed),
                lines,
            )),
            Some(at) if at - history.last_fault_end > c.bound_ms => out.push(Violation::new(
                "convergence",
                &c.pool,
                format!(
                    "showed {} after {} ms, bound {} ms",
                    c.expected,
                    at - history.last_fault_end,
                    c.bound_ms
                ),
                lines,
            )),
            Some(_) => {}
        }
    }
    out
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// No leaks: operator sessions per target, the leader's fds and its pool series per pool are back
/// to the baseline after the churn; no deleted pool keeps a series; and for every process sampled
/// at least `rss_min_span_ms`, the median RSS of the last third of its samples is at most
/// `rss_ratio` times that of the first third.
pub fn check_leaks(history: &History, bounds: &Bounds) -> Vec<Violation> {
    let mut out = Vec::new();
    let leaks = &history.leaks;
    let baseline: BTreeMap<&str, i64> = leaks
        .baseline_sessions
        .iter()
        .map(|(t, n)| (t.as_str(), *n))
        .collect();
    for (target, now) in &leaks.final_sessions {
        let before = baseline.get(target.as_str()).copied().unwrap_or(0);
        if *now > before + bounds.session_slack {
            out.push(Violation::new(
                "leaks",
                target,
                format!("{now} operator sessions at the end, {before} at the baseline"),
                vec![],
            ));
        }
    }
    if let Some((before, now)) = leaks.fds
        && now > before + bounds.fd_slack
    {
        out.push(Violation::new(
            "leaks",
            "leader",
            format!("{now} fds at the end, {before} at the baseline"),
            vec![],
        ));
    }
    if let Some((before, now)) = leaks.series_per_pool
        && now > before * 1.1 + 1.0
    {
        out.push(Violation::new(
            "leaks",
            "leader",
            format!("{now:.1} series per pool at the end, {before:.1} at the baseline"),
            vec![],
        ));
    }
    for pool in &leaks.deleted_with_series {
        out.push(Violation::new(
            "leaks",
            pool,
            "a deleted pool still has metric series".to_owned(),
            vec![],
        ));
    }
    let mut rss: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
    for s in history.samples.iter().filter(|s| s.what == "rss_kib") {
        rss.entry(s.subject.as_str())
            .or_default()
            .push((s.time, s.value));
    }
    for (subject, mut points) in rss {
        points.sort_by_key(|p| p.0);
        let span = points.last().map_or(0, |l| l.0) - points.first().map_or(0, |f| f.0);
        if span < bounds.rss_min_span_ms || points.len() < 6 {
            continue;
        }
        let third = points.len() / 3;
        let first = median(points[..third].iter().map(|p| p.1).collect());
        let last = median(points[points.len() - third..].iter().map(|p| p.1).collect());
        if let (Some(first), Some(last)) = (first, last)
            && last > first * bounds.rss_ratio
        {
            out.push(Violation::new(
                "leaks",
                subject,
                format!("RSS median {last:.0} KiB in the last third, {first:.0} KiB in the first"),
                vec![],
            ));
        }
    }
    out
}

/// No password in any log, status, event or the audit log: none of `passwords` occurs in any of
/// `texts` (source name, text). The verdict names the password by its index, never its value.
pub fn check_passwords(passwords: &[String], texts: &[(String, String)]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (source, text) in texts {
        for (i, password) in passwords.iter().enumerate() {
            if password.len() < 6 {
                continue;
            }
            if let Some(at) = text.find(password.as_str()) {
                out.push(Violation::new(
                    "no-password",
                    source,
                    format!("password #{i} appears at byte {at}"),
                    vec![],
                ));
            }
        }
    }
    out
}

/// Isolation: no credentialed attempt for a pool whose host its Secret does not allow (those
/// pools name [`ISOLATED_DB`], so PostgreSQL's log tells their logins apart).
pub fn check_isolation(history: &History) -> Vec<Violation> {
    history
        .attempts
        .iter()
        .filter(|a| a.db == ISOLATED_DB)
        .map(|a| {
            Violation::new(
                "isolation",
                &a.target,
                format!(
                    "a credentialed attempt as {}@{} at {}",
                    a.user, a.db, a.time
                ),
                vec![],
            )
        })
        .collect()
}
