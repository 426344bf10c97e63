//! The report: one markdown table per scenario and the targets, met or missed.
//!
//! Lives here: [`table`] (rows of the issue, one column per pool configuration) and [`targets`]
//! (dbpool-client's targets of #30 checked against the figures). Must not live here: measuring
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
        "failure latency before the breaker opens p99 (ms) [calls]",
        &|r| {
            let h = &r.merged.closed_fail_hist;
            if h.is_empty() {
                return na();
            }
            format!("{} [{}]", us_ms(h.value_at_quantile(0.99)), h.len())
        },
    );
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
        // PgBouncer: the tasks' own connects to it are not connect attempts to PostgreSQL.
        let app = r.down_app_connects.unwrap_or(0);
        let total = r.down_attempts.active_opens.saturating_sub(app);
        let mut cell = format!(
            "{} [{}, {}]",
            rate(total, r.down),
            total,
            r.down_attempts.attempt_fails
        );
        if let Some(app) = r.down_app_connects {
            let _ = write!(cell, " (+{app} to PgBouncer)");
        }
        cell
    });
    row(
        "SYNs at PostgreSQL's port while down, server side [/s]",
        &|r| {
            r.down_syns
                .map_or_else(na, |n| format!("{n} [{}]", rate(n, r.down)))
        },
    );
    row(
        "credentialed connects while down [pings = SYNs − them; pings its status reports]",
        &|r| {
            let reported = r.down_pings.map_or_else(na, |p| p.to_string());
            match (r.down_connects, r.down_syns) {
                (Some(c), Some(syn)) => format!("{c} [{}; {reported}]", syn.saturating_sub(c)),
                (Some(c), None) => format!("{c} [–; {reported}]"),
                _ => na(),
            }
        },
    );
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

/// Connect attempts the backoff schedule allows in `down`: one per step (1 s, ×2: due 1, 3,
/// 7, 15, 31 ... s after the loss), plus one for the ±10 % jitter at a step's edge.
pub fn backoff_steps(down: Duration) -> u64 {
    let mut steps = 0;
    let mut due = 1.0;
    let mut delay = 1.0;
    while due <= down.as_secs_f64() * 1.1 {
        steps += 1;
        delay *= 2.0;
        due += delay;
    }
    steps + 1
}

/// dbpool-client's targets of #30 in `scenario` (standalone, and with a DbPool), one line each.
pub fn targets(scenario: Scenario, runs: &[RunResult]) -> Vec<String> {
    let mut lines = Vec::new();
    for r in runs.iter().filter(|r| r.kind.is_ours()) {
        let who = format!("{} / {}", scenario.id(), r.kind.label());
        let (goal_ms, what) = if scenario == Scenario::IdleBlip {
            (100, "idle blip")
        } else if r.kind.follows_dbpool() {
            (500, "with a DbPool")
        } else {
            (1_000, "standalone")
        };
        lines.push(match all_ok(r) {
            Some(ns) => format!(
                "- {who}: ready → all tasks succeed ≤ {goal_ms} ms ({what}): {} ({} ms)",
                verdict(ns <= goal_ms * 1_000_000),
                ms(ns)
            ),
            None => format!(
                "- {who}: ready → all tasks succeed ≤ {goal_ms} ms ({what}): MISSED (not all tasks within the cap)"
            ),
        });
        for (h, when) in [
            (&r.merged.closed_fail_hist, "before the breaker opens"),
            (&r.merged.open_fail_hist, "while the breaker is Open"),
        ] {
            lines.push(if h.is_empty() {
                format!("- {who}: failure p99 ≤ 50 ms {when}: n/a (no such failure)")
            } else {
                let p99 = h.value_at_quantile(0.99);
                format!(
                    "- {who}: failure p99 ≤ 50 ms {when}: {} ({} ms over {} calls)",
                    verdict(p99 <= 50_000),
                    us_ms(p99),
                    h.len()
                )
            });
        }
        if scenario != Scenario::IdleBlip {
            let allowed = backoff_steps(r.down);
            if let Some(c) = r.down_connects {
                lines.push(format!(
                    "- {who}: credentialed connects while down ≤ 1 per backoff step ({allowed} in {:.1} s): {} ({c})",
                    r.down.as_secs_f64(),
                    verdict(c <= allowed)
                ));
            }
            match (r.down_syns, r.down_connects) {
                // With a DbPool the client pings nothing (the operator's pings are the SYNs).
                (syn, _) if r.kind.follows_dbpool() => lines.push(format!(
                    "- {who}: no pings of its own while its DbPool watch is live: {} (its status: {}; SYNs at the server's port, the operator's pings and attempts and the client's connects: {})",
                    verdict(r.down_pings == Some(0)),
                    r.down_pings.map_or_else(|| "–".into(), |p| p.to_string()),
                    syn.map_or_else(|| "not counted".into(), |s| s.to_string())
                )),
                (Some(syn), Some(c)) => {
                    let pings = syn.saturating_sub(c);
                    let per_s = pings as f64 / r.down.as_secs_f64().max(1e-9);
                    lines.push(format!(
                        "- {who}: pings while down ≤ 1/s, counted at the server's port: {} ({pings} in {:.1} s, {per_s:.2}/s; its status: {})",
                        verdict(pings as f64 <= r.down.as_secs_f64() + 1.0),
                        r.down.as_secs_f64(),
                        r.down_pings.map_or_else(|| "–".into(), |p| p.to_string())
                    ));
                }
                _ => lines.push(format!(
                    "- {who}: pings while down ≤ 1/s: not counted (no private network namespace)"
                )),
            }
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
