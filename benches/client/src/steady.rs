//! Steady throughput, interleaved: every pool configuration in turn, several rounds, the median.
//!
//! Lives here: [`rounds`] and [`table`]. The machine is shared, so its load drifts over minutes:
//! the per-scenario steady windows (`scenario`) are minutes apart for the first and the last
//! column, while these rounds put every configuration next to every other one several times, and
//! the median of a configuration's rounds is what the ops/s target is checked against. Must not
//! live here: outages (`scenario`).

use std::{fmt::Write as _, sync::Arc, time::Duration};

use dbpool_testkit::postgres::PgServer;
use tokio::{runtime::Handle, time::sleep};

use crate::{
    load::{Mark, Marks, merge},
    pools::{Op, PoolKind},
    scenario::{quiesce, start_load},
};

/// ops/s of each configuration in each round: `result[k][round]`.
pub async fn rounds(
    kinds: &[PoolKind],
    pg: &PgServer,
    op: Op,
    n: usize,
    warmup: Duration,
    window: Duration,
    runtime: &Handle,
) -> Result<Vec<Vec<f64>>, String> {
    let mut result = vec![Vec::new(); kinds.len()];
    for round in 0..n {
        for (i, &kind) in kinds.iter().enumerate() {
            // PgBouncer's tasks each hold their connection: there is no checkout to measure.
            if op == Op::CheckoutOnly && kind.is_bouncer() {
                continue;
            }
            quiesce(pg).await;
            let marks = Arc::new(Marks::new());
            let (pool, load) = start_load(kind, pg, &marks, op, runtime).await?;
            // Fixed measurement windows, not waits for a condition.
            sleep(warmup).await;
            marks.set(Mark::SteadyStart);
            sleep(window).await;
            marks.set(Mark::SteadyEnd);
            let stats = load.stats.clone();
            load.stop(Duration::from_secs(2)).await;
            let ops = merge(&stats).steady_ok as f64 / window.as_secs_f64();
            eprintln!(
                "bench-client: steady round {round} / {} / {}: {ops:.0} ops/s",
                op.id(),
                kind.id()
            );
            result[i].push(ops);
            if let Ok(pool) = Arc::try_unwrap(pool) {
                let _ = runtime.spawn(pool.close()).await;
            }
        }
    }
    Ok(result)
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The table of the rounds, and the target line for each dbpool-client configuration.
pub fn table(kinds: &[PoolKind], op: Op, ops: &[Vec<f64>]) -> (String, Vec<String>) {
    let mut out = format!(
        "### Steady throughput, interleaved rounds: {}\n\n| | median ops/s | rounds |\n|---|---:|---|\n",
        op.title()
    );
    for (k, v) in kinds.iter().zip(ops) {
        if v.is_empty() {
            let _ = writeln!(out, "| {} | – | not run |", k.label());
            continue;
        }
        let each: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} |",
            k.label(),
            median(v),
            each.join(", ")
        );
    }
    // #30: ops/s ≥ deadpool's (at its defaults) in the same run.
    let deadpool = kinds
        .iter()
        .zip(ops)
        .find(|(k, _)| **k == PoolKind::DeadpoolDefault)
        .map(|(_, v)| median(v));
    let mut targets = Vec::new();
    for (k, v) in kinds.iter().zip(ops).filter(|(k, _)| k.is_ours()) {
        if let Some(d) = deadpool.filter(|d| *d > 0.0) {
            let m = median(v);
            targets.push(format!(
                "- steady ({}, interleaved medians) / {}: ops/s ≥ deadpool's: {} ({m:.0} vs {d:.0}, {:+.1}%)",
                op.id(),
                k.label(),
                if m >= d { "met" } else { "MISSED" },
                (m / d - 1.0) * 100.0
            ));
        }
    }
    (out, targets)
}
