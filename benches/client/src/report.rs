//! The report: one markdown table per scenario and the targets, met or missed.
//!
//! Lives here: [`table`] (rows of the issue, one column per pool configuration) and [`targets`]
//! (dbpool-client's four targets checked against the figures). Must not live here: measuring
//! (`scenario`, `load`).

use std::{fmt::Write as _, time::Duration};

use crate::{
    pools::PoolKind,
    scenario::{RunResult, Scenario, TASKS},
};

fn ms(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1e6)
}

fn dms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn us_ms(us: u64) -> String {
    if us < 1_000 {
        format!("{:.3}", us as f64 / 1e3)
    } else {
        format!("{:.1}", us as f64 / 1e3)
    }
}

fn rate(n: u64, d: Duration) -> String {
    if d.is_zero() {
        return "–".into();
    }
    let r = n as f64 / d.as_secs_f64();
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.2}")
    }
}

/// ops/s in the steady window.
pub fn steady_ops(r: &RunResult) -> f64 {
    r.merged.steady_ok as f64 / r.steady.as_secs_f64()
}

/// Ready → all tasks succeeded (None: some task never did within the cap).
pub fn all_ok(r: &RunResult) -> Option<u64> {
    let mut worst = 0;
    for t in &r.merged.first_ok_after_ready {
        worst = worst.max(t.as_ref()?.saturating_sub(r.ready_at));
    }
    Some(worst)
}

fn first_ok(r: &RunResult) -> Option<u64> {
    r.merged
        .first_ok_after_ready
        .iter()
        .flatten()
        .min()
        .map(|t| t.saturating_sub(r.ready_at))
}

/// The first successful connect of dbpool-client → all tasks succeeded, in ns.
pub fn trial_to_all(r: &RunResult) -> Option<i128> {
    let trial = i128::try_from(r.ready_to_trial?.as_nanos()).ok()?;
    Some(i128::from(all_ok(r)?) - trial)
}

/// The markdown table of one scenario.
pub fn table(scenario: Scenario, runs: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", scenario.title());
    let _ = write!(out, "| |");
    for r in runs {
        let _ = write!(out, " {} |", r.kind.label());
    }
    let _ = write!(out, "\n|---|");
    for _ in runs {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    let mut row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
        let _ = write!(out, "| {name} |");
        for r in runs {
            let _ = write!(out, " {} |", f(r));
        }
        out.push('\n');
    };
    let na = || "–".to_owned();
    row("steady ops/s", &|r| format!("{:.0}", steady_ops(r)));
    row("first failure after the stop (ms)", &|r| {
        r.merged
            .first_fail_after_stop
            .map_or_else(na, |t| ms(t.saturating_sub(r.stop_at)))
    });
    row("failed calls while down (/s)", &|r| {
        let window = Duration::from_nanos(r.ready_at.saturating_sub(r.stop_at));
        format!(
            "{} ({})",
            r.merged.down_failures,
            rate(r.merged.down_failures, window)
        )
    });
    row("failure latency while down p50 / p99 / max (ms)", &|r| {
        let h = &r.merged.down_fail_hist;
        if h.is_empty() {
            return na();
        }
        format!(
            "{} / {} / {}",
            us_ms(h.value_at_quantile(0.5)),
            us_ms(h.value_at_quantile(0.99)),
            us_ms(h.max())
        )
    });
    row(
        "failure latency while the breaker is Open p99 (ms) [calls]",
        &|r| {
            let h = &r.merged.open_fail_hist;
            if !r.kind.is_ours() {
                return "no breaker".into();
            }
            if h.is_empty() {
                return "never Open".into();
            }
            format!("{} [{}]", us_ms(h.value_at_quantile(0.99)), h.len())
        },
    );
    row("longest call while down (ms)", &|r| {
        us_ms(r.merged.down_max_call_us)
    });
    row("connect attempts/s while down [total, refused]", &|r| {
        format!(
            "{} [{}, {}]",
            rate(r.down_attempts.active_opens, r.down),
            r.down_attempts.active_opens,
            r.down_attempts.attempt_fails
        )
    });
    row("connect attempts/s while down, after the first 5 s", &|r| {
        r.late_attempts
            .map_or_else(na, |(c, d)| rate(c.active_opens, d))
    });
    row("pg_ctl stop (ms)", &|r| dms(r.stop_took));
    row("pg_ctl start → ready (ms) [connects meanwhile]", &|r| {
        format!("{} [{}]", dms(r.restart), r.restart_attempts.active_opens)
    });
    row("ready → first successful trial/retry (ms)", &|r| {
        if !r.kind.is_ours() {
            return "no breaker".into();
        }
        r.ready_to_trial.map_or_else(|| "none (cap)".into(), dms)
    });
    row("ready → first task succeeds (ms)", &|r| {
        first_ok(r).map_or_else(|| "none (cap)".into(), ms)
    });
    row("ready → all tasks succeed (ms)", &|r| {
        all_ok(r).map_or_else(
            || {
                let n = r.merged.first_ok_after_ready.iter().flatten().count();
                format!("{n}/{TASKS} (cap)")
            },
            ms,
        )
    });
    row(
        "first successful trial/retry → all tasks succeed (ms)",
        &|r| trial_to_all(r).map_or_else(na, |ns| format!("{:.1}", ns as f64 / 1e6)),
    );
    row("failed calls after ready", &|r| {
        r.merged.errors_after_ready.to_string()
    });
    out
}

/// dbpool-client's targets in `scenario`, one line each.
pub fn targets(scenario: Scenario, runs: &[RunResult]) -> Vec<String> {
    let mut lines = Vec::new();
    let fastest_peer = runs
        .iter()
        .filter(|r| !r.kind.is_ours())
        .map(steady_ops)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    for r in runs.iter().filter(|r| r.kind.is_ours()) {
        let who = format!("{} / {}", scenario.id(), r.kind.label());
        let h = &r.merged.open_fail_hist;
        lines.push(if h.is_empty() {
            format!("- {who}: failure p99 ≤ 1 ms while Open: n/a (the breaker did not open)")
        } else {
            let p99 = h.value_at_quantile(0.99);
            format!(
                "- {who}: failure p99 ≤ 1 ms while Open: {} ({} ms)",
                verdict(p99 <= 1_000),
                us_ms(p99)
            )
        });
        if let Some((c, d)) = r.late_attempts {
            let per_s = c.active_opens as f64 / d.as_secs_f64().max(1e-9);
            lines.push(format!(
                "- {who}: connect attempts ≤ 1/s past the first delays: {} ({per_s:.2}/s)",
                verdict(per_s <= 1.0)
            ));
        }
        if let Some(ns) = trial_to_all(r) {
            lines.push(format!(
                "- {who}: every task succeeds ≤ 100 ms after the first successful trial: {} ({:.1} ms)",
                verdict(ns <= 100_000_000),
                ns as f64 / 1e6
            ));
        } else {
            lines.push(format!(
                "- {who}: every task succeeds ≤ 100 ms after the first successful trial: MISSED (not all tasks succeeded, or no trial seen, within the cap)"
            ));
        }
        if let Some(best) = fastest_peer {
            let ours = steady_ops(r);
            lines.push(format!(
                "- {who}: steady ops/s within 10% of the fastest peer: {} ({ours:.0} vs {best:.0}, {:+.1}%)",
                verdict(ours >= 0.9 * best),
                (ours / best - 1.0) * 100.0
            ));
        }
    }
    lines
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The configurations, one line each.
pub fn configurations(kinds: &[PoolKind]) -> String {
    let mut out = String::new();
    for k in kinds {
        let _ = writeln!(out, "- **{}**: {}", k.label(), k.describe());
    }
    out
}
