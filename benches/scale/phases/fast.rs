//! The short interval: every pool patched to it, then a window with a quiet database.
//!
//! Lives here: `Run::fast` (schedule fidelity, probe duration, CPU per probe and writes at the
//! short interval; it calls the churn window after the quiet one). Must not live here: the churn
//! itself (`churn`).

use std::time::Duration;

use dbpool_operator::api::GoDuration;

use crate::{
    report::{show, stats, verdict},
    run::Run,
};

impl Run {
    /// Short interval: a quiet window, then a window with connection churn on the servers.
    pub async fn fast(&mut self) {
        let interval = self.s.fast_interval;
        let iv = GoDuration(interval).to_string();
        progress!("N={}: patching every pool to a {iv} interval", self.n);
        self.patch_all(|_| serde_json::json!({"spec": {"healthCheck": {"interval": iv}}}))
            .await;
        self.wait_observed("every pool to observe the interval change")
            .await;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;

        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (usage, from, to) = self.usage_end(begin);
        let op = self.op().generation;
        let late = stats(self.interval_lateness(op, interval, from, to));
        self.report.row(
            format!("schedule fidelity, {iv} interval"),
            show(late),
            "≤ 50 ms p99",
            &verdict(late.is_some_and(|s| s.p99 <= 50.0)),
        );
        let latency = stats(
            self.store
                .probes()
                .iter()
                .filter(|e| e.op == op && !e.shared && e.finish_us >= from && e.finish_us <= to)
                .map(|e| (e.finish_us - e.start_us) as f64 / 1000.0)
                .collect(),
        );
        self.report.row(
            format!("probe duration, {iv} interval (ms resolution)"),
            show(latency),
            "",
            "",
        );
        self.report.row(
            format!("operator CPU, {iv} interval, shared connections"),
            format!(
                "{:.1} % of one core; {:.3} s per 1,000 results ({} probes, {} shared results in \
                 {:.0} s); PostgreSQL {:.3} s per 1,000 probes, {} server processes; {}",
                usage.core_percent(),
                usage.cpu_per_1000(),
                usage.probes,
                usage.shared,
                usage.wall,
                usage.pg_cpu * 1000.0 / usage.probes.max(1) as f64,
                usage.pg_processes,
                self.control_plane(&usage)
            ),
            "",
            "",
        );
        let quiet = self.writes_per_pool_hour(usage.writes, usage.wall);
        if usage.writes == 0 {
            self.control_plane_idle = usage.control_plane.map(|c| c / usage.wall);
        }
        self.report.row(
            format!("status writes per pool-hour, quiet DB, {iv} interval (refresh 5m not due)"),
            format!(
                "{quiet:.2} ({} writes in {:.0} s)",
                usage.writes, usage.wall
            ),
            "",
            "",
        );
        self.churn(interval).await;
    }
}
