//! Restarts: SIGKILL the operator and start a new one; how fast it resumes N pools, the spread
//! of its first probes, what it writes and how much memory it takes; with a short status refresh,
//! the status writes per pool-hour that refresh causes.
//!
//! Lives here: `Run::restart_short_refresh` and `Run::restart` (also used by `coalescing` for
//! the second restart). Must not live here: starting and killing processes (`operator`).

use std::time::{Duration, Instant};

use dbpool_operator::api::GoDuration;

use crate::{
    apiserver::{ApiSample, apiserver_sample, request_delta},
    procfs::{now_us, us},
    report::{ms, show, stats, verdict},
    run::Run,
    store::per_pool,
    support::wait::wait_for,
};

impl Run {
    /// Restart into an operator with a short status refresh: resume time and spread, then the
    /// writes per pool-hour that refresh causes.
    pub async fn restart_short_refresh(&mut self) {
        let refresh = self.s.short_refresh;
        self.restart(refresh, "restart (kill -9, new operator)")
            .await;
        let interval = self.s.fast_interval;
        // The first probe after a restart writes (nothing was written by this process yet); then
        // one write per refresh. Start counting after that first round.
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        let window = self.s.window.max(refresh * 3);
        let api_before = apiserver_sample().await;
        let begin = self.usage_begin();
        tokio::time::sleep(window).await;
        let (usage, _, _) = self.usage_end(begin);
        let api_after = apiserver_sample().await;
        let measured = self.writes_per_pool_hour(usage.writes, usage.wall);
        let period =
            (refresh.as_secs_f64() / interval.as_secs_f64()).ceil() * interval.as_secs_f64();
        let formula = 3600.0 / period;
        let api_delta = request_delta(&api_before, &api_after);
        self.report.row(
            format!(
                "status writes per pool-hour, status_refresh {}, {} interval",
                GoDuration(refresh),
                GoDuration(interval)
            ),
            format!(
                "{measured:.0} measured ({} writes seen, {api_delta} counted by the apiserver, \
                 in {:.0} s); formula 3600 / (⌈refresh / interval⌉ × interval) = {formula:.0}; \
                 operator {:.3} s CPU per 1,000 results; {}",
                usage.writes,
                usage.wall,
                usage.cpu_per_1000(),
                self.control_plane(&usage)
            ),
            "",
            "",
        );
    }

    /// Kills the operator and starts a new one; reports resume time and first-probe spread,
    /// then what the new operator wrote and its memory.
    pub async fn restart(&mut self, refresh: Duration, what: &str) {
        let api_before = apiserver_sample().await;
        if let Some(old) = self.op.take() {
            old.kill().await;
        }
        let t_start = self.start_operator(refresh).await;
        let op = self.generation;
        let interval = self.s.fast_interval;
        wait_for(
            "every pool probed by the new operator",
            interval + Duration::from_secs(60) + Duration::from_millis(20) * self.n as u32,
            || {
                let probed = self.store.pools_probed(op, t_start, |_| true);
                std::future::ready((probed == self.n).then_some(()))
            },
        )
        .await;
        let probes = per_pool(&self.store.probes(), self.n, op);
        let firsts: Vec<f64> = probes
            .iter()
            .filter_map(|events| events.iter().find(|e| e.start_us >= t_start))
            .map(|e| (e.start_us - t_start) as f64 / 1000.0)
            .collect();
        let earliest = firsts.iter().copied().fold(f64::INFINITY, f64::min);
        let spread = stats(firsts);
        let resumed = spread.map_or(f64::NAN, |s| s.max);
        self.report.row(
            format!("{what}: first probe of each pool, from process start"),
            format!(
                "{}; first probe after {}; all N resumed after {:.2} s",
                show(spread),
                ms(earliest),
                resumed / 1000.0
            ),
            &format!(
                "spread over one interval ({})",
                GoDuration(self.s.fast_interval)
            ),
            &verdict(
                spread.is_some_and(|s| s.max - earliest <= us(interval) as f64 / 1000.0 + 50.0),
            ),
        );
        self.restart_writes(t_start, api_before, what).await;
    }

    /// What the new operator (started at `t_start`) wrote once it probed every pool, and its
    /// memory and connections.
    async fn restart_writes(&mut self, t_start: i64, api_before: Option<ApiSample>, what: &str) {
        let interval = self.s.fast_interval;
        let writes = self.store.status_writes(t_start, now_us());
        let connections = self.op().apiserver_connections();
        // The writes the restart causes: wait until they stop (no new one for 2 s), at most one
        // more interval and 10 s (a short status_refresh keeps writing).
        let settle = Instant::now();
        let mut last = (writes, Instant::now());
        while settle.elapsed() < interval + Duration::from_secs(10)
            && last.1.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.store.status_writes(t_start, now_us());
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        let t_end = now_us();
        let mut written = vec![false; self.n];
        let mut last_write = 0.0f64;
        for o in self.store.observations() {
            if o.status_changed && o.at_us >= t_start && o.at_us <= t_end {
                written[o.pool as usize] = true;
                last_write = last_write.max((o.at_us - t_start) as f64 / 1000.0);
            }
        }
        let pools_written = written.iter().filter(|w| **w).count();
        let api_after = apiserver_sample().await;
        let secret_gets = match (&api_before, &api_after) {
            (Some(a), Some(b)) => format!("{:.0}", b.secret_gets - a.secret_gets),
            _ => "?".to_owned(),
        };
        let (hwm, rss) = self.op().memory_kib();
        self.report.row(
            format!("{what}: status writes and memory of the new operator"),
            format!(
                "{pools_written} of {} pools' status written (the last seen {:.1} s after \
                 start; {writes} writes by the time every pool was probed); {secret_gets} Secret \
                 GETs; VmHWM {:.1} MiB, VmRSS {:.1} MiB; {} connections to the apiserver when \
                 every pool was probed",
                self.n,
                last_write / 1000.0,
                hwm as f64 / 1024.0,
                rss as f64 / 1024.0,
                connections.map_or("?".to_owned(), |c| c.to_string())
            ),
            "≤ 64 MiB RSS",
            &verdict(hwm as f64 / 1024.0 <= 64.0),
        );
    }
}
