//! The end of a run: the audit log and the servers' logs read into the history, the checkers
//! run, and the report written (text and JSON) and printed.
//!
//! Lives here: [`collect`] (logs into the history, texts for the password checker) and
//! [`judge`] (checkers, report files, the verdict). A failure prints the seed, the checker, the
//! subject and the slice of history that shows it. Must not live here: the checkers themselves
//! (the library's `checks`).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use dbpool_soak::{
    audit::{Record, parse_line},
    checks::{self, Bounds, Violation},
    history::{FaultKind, History},
    pglog,
    plan::Plan,
};

use crate::world::World;

/// Reads the audit log and every server's log into `history`; returns the texts the password
/// checker scans (every operator log, the audit log, the servers' logs, the final DbPools and
/// events).
pub async fn collect(
    world: &World,
    history: &mut History,
    audit: &Path,
    dumps: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut texts = dumps;
    for (name, text) in audit_logs(audit) {
        read_audit(history, &text);
        texts.push((name, text));
    }
    for t in &world.targets {
        let log = std::fs::read_to_string(&t.log).unwrap_or_default();
        history
            .attempts
            .extend(log.lines().filter_map(|l| pglog::parse_line(&t.name, l)));
        texts.push((format!("server log {}", t.name), log));
    }
    for r in &world.replicas {
        let log = std::fs::read_to_string(&r.log).unwrap_or_default();
        history
            .terms
            .extend(log.lines().filter_map(dbpool_soak::oplog::parse_term));
        texts.push((format!("operator log {}", r.id), log));
    }
    history.terms.sort_by_key(|t| t.time);
    texts
}

/// Every audit log file beside `audit` (rotated ones, `audit-<time>.log`, first), as (name, text).
pub fn audit_logs(audit: &Path) -> Vec<(String, String)> {
    let dir = audit.parent().unwrap_or(Path::new("."));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("audit") && n.ends_with(".log"))
        .collect();
    names.sort_by_key(|n| (n == "audit.log", n.clone()));
    names
        .into_iter()
        .map(|n| {
            (
                format!("audit log {n}"),
                std::fs::read_to_string(dir.join(&n)).unwrap_or_default(),
            )
        })
        .collect()
}

/// The status writes and events of one audit log text, into `history` (writes from a minute
/// before the nemesis on).
pub fn read_audit(history: &mut History, text: &str) {
    for line in text.lines() {
        match parse_line(line) {
            Some(Record::Status(w)) if w.time >= history.start - 60_000 => history.writes.push(w),
            Some(Record::Event(t, reason, pool, user)) => {
                history.events.push((t, reason, pool, user))
            }
            _ => {}
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Figures of the run, for people.
fn figures(
    history: &History,
    plan: &Plan,
    clients: (u64, u64),
) -> BTreeMap<String, serde_json::Value> {
    let mut f = BTreeMap::new();
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for fault in &history.faults {
        *by_kind.entry(format!("{:?}", fault.kind)).or_default() += 1;
    }
    let mut actions: BTreeMap<String, usize> = BTreeMap::new();
    for a in &history.actions {
        let name = format!("{:?}", a.kind);
        *actions
            .entry(name.split('(').next().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let accepted = history.writes.iter().filter(|w| w.accepted()).count();
    let opens = history
        .writes
        .iter()
        .filter(|w| w.accepted() && w.breaker.as_deref() == Some("Open"))
        .count();
    let conv: Vec<i64> = history
        .convergence
        .iter()
        .filter_map(|c| c.at.map(|a| a - history.last_fault_end))
        .collect();
    let rss: Vec<f64> = history
        .samples
        .iter()
        .filter(|s| s.what == "rss_kib")
        .map(|s| s.value)
        .collect();
    f.insert("seed".into(), history.seed.into());
    f.insert(
        "nemesis_s".into(),
        ((history.last_fault_end - history.start) / 1000).into(),
    );
    f.insert("pools".into(), history.pools.len().into());
    f.insert("planned_steps".into(), plan.steps.len().into());
    f.insert(
        "faults_by_kind".into(),
        serde_json::to_value(&by_kind).unwrap_or_default(),
    );
    f.insert(
        "faults_missing".into(),
        FaultKind::ALL
            .iter()
            .filter(|k| !by_kind.contains_key(&format!("{k:?}")))
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .into(),
    );
    f.insert(
        "actions_by_kind".into(),
        serde_json::to_value(&actions).unwrap_or_default(),
    );
    f.insert("status_writes".into(), history.writes.len().into());
    f.insert("status_writes_accepted".into(), accepted.into());
    f.insert(
        "status_writes_refused".into(),
        (history.writes.len() - accepted).into(),
    );
    f.insert("writes_showing_open".into(), opens.into());
    f.insert("events".into(), history.events.len().into());
    f.insert(
        "credentialed_attempts".into(),
        history
            .attempts
            .iter()
            .filter(|a| a.user == "app")
            .count()
            .into(),
    );
    f.insert(
        "convergence_max_ms".into(),
        conv.iter().max().copied().unwrap_or(-1).into(),
    );
    f.insert(
        "rss_kib_max".into(),
        rss.iter().copied().fold(0.0, f64::max).into(),
    );
    f.insert("client_queries_ok".into(), clients.0.into());
    f.insert("client_queries_failed".into(), clients.1.into());
    f.insert("load_average".into(), load_average().into());
    f
}

/// Runs every checker, writes `report.txt`, `report.json` and `history.json` into `out`, prints
/// the report; true when every checker passed.
pub fn judge(
    history: &History,
    plan: &Plan,
    passwords: &[String],
    texts: &[(String, String)],
    out: &Path,
    clients: (u64, u64),
) -> bool {
    let bounds = Bounds::default();
    let verdicts = checks::run(history, &bounds, passwords, texts);
    let figures = figures(history, plan, clients);
    let cost: Vec<serde_json::Value> = checks::replay_cost(history, &bounds)
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "target": c.target,
                "seen": c.seen,
                "allowed": c.allowed,
                "unexplained": c.unexplained.len(),
                "max_lag_ms": c.max_lag_ms,
            })
        })
        .collect();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "soak seed {} ({} pools, {} faults, {} actions)",
        history.seed,
        history.pools.len(),
        history.faults.len(),
        history.actions.len()
    );
    for (k, v) in &figures {
        let _ = writeln!(text, "  {k}: {v}");
    }
    for c in &cost {
        let _ = writeln!(
            text,
            "  cost {}: {} credentialed attempts, the replay allows {}, {} unexplained, largest lag {} ms",
            c["target"].as_str().unwrap_or_default(),
            c["seen"],
            c["allowed"],
            c["unexplained"],
            c["max_lag_ms"]
        );
    }
    let mut ok = true;
    for (name, violations) in &verdicts {
        let verdict = if violations.is_empty() {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", violations.len())
        };
        let _ = writeln!(text, "check {name}: {verdict}");
        for v in violations.iter().take(5) {
            ok = false;
            print_violation(&mut text, history.seed, v);
        }
        ok &= violations.is_empty();
    }
    let json = serde_json::json!({
        "seed": history.seed,
        "passed": ok,
        "figures": figures,
        "cost": cost,
        "bounds": bounds,
        "checks": verdicts.iter().map(|(n, v)| serde_json::json!({"checker": n, "passed": v.is_empty(), "violations": v})).collect::<Vec<_>>(),
    });
    let _ = std::fs::write(out.join("report.txt"), &text);
    let _ = std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    );
    let _ = std::fs::write(
        out.join("history.json"),
        serde_json::to_string(history).unwrap_or_default(),
    );
    let _ = std::fs::write(
        out.join("plan.json"),
        serde_json::to_string_pretty(plan).unwrap_or_default(),
    );
    print!("{text}");
    println!("report: {}", out.join("report.txt").display());
    ok
}

fn print_violation(text: &mut String, seed: u64, v: &Violation) {
    let _ = writeln!(
        text,
        "  VIOLATION seed={seed} checker={} subject={}: {}",
        v.checker, v.subject, v.message
    );
    for line in v.slice.iter().take(14) {
        let _ = writeln!(text, "    | {line}");
    }
}
