//! Steady state on the long interval: schedule fidelity, operator CPU and RSS, status writes per
//! pool-hour.
//!
//! Lives here: `Run::steady`. Must not live here: the short-interval windows (`fast`, `churn`).

use dbpool_operator::api::GoDuration;

use crate::{
    apiserver::{apiserver_sample, request_delta},
    report::{show, stats, verdict},
    run::Run,
    settings::Mode,
};

impl Run {
    /// Steady state on the long interval: CPU, RSS, fidelity, writes.
    pub async fn steady(&mut self) {
        let interval = self.s.steady_interval;
        let window = self.s.steady_window(self.n);
        progress!(
            "N={}: steady state, {} interval, {:.0} s window",
            self.n,
            GoDuration(interval),
            window.as_secs_f64()
        );
        let api_before = apiserver_sample().await;
        let begin = self.usage_begin();
        tokio::time::sleep(window).await;
        let (usage, from, to) = self.usage_end(begin);
        let api_after = apiserver_sample().await;
        let op = self.op().generation;
        let late = stats(self.interval_lateness(op, interval, from, to));
        let iv = GoDuration(interval);
        self.note_stream_probes(op, interval, from, to);
        self.report.row(
            format!("schedule fidelity, {iv} interval (probe start − planned instant)"),
            show(late),
            "≤ 50 ms p99",
            &verdict(late.is_some_and(|s| s.p99 <= 50.0)),
        );
        let percent = usage.core_percent();
        self.report.row(
            format!("operator CPU, steady state, {iv} interval"),
            format!(
                "{percent:.2} % of one core ({:.2} s CPU in {:.0} s); {:.3} s per 1,000 results \
                 ({} probes, {} shared results); {}",
                usage.cpu,
                usage.wall,
                usage.cpu_per_1000(),
                usage.probes,
                usage.shared,
                self.control_plane(&usage)
            ),
            "≤ 5 % of one core",
            &verdict(percent <= 5.0),
        );
        let hwm = usage.hwm_kib as f64 / 1024.0;
        let rss_scope = match self.s.mode {
            Mode::Child => "operator process",
            Mode::InProcess => "whole bench process (operator in-process: an upper bound)",
        };
        self.report.row(
            "peak RSS (VmHWM) since operator start",
            format!(
                "{hwm:.1} MiB (VmRSS now {:.1} MiB; {rss_scope}); {} connections to the \
                 apiserver",
                usage.rss_kib as f64 / 1024.0,
                self.op()
                    .apiserver_connections()
                    .map_or("?".to_owned(), |c| c.to_string())
            ),
            "≤ 64 MiB",
            &verdict(hwm <= 64.0),
        );
        let per_hour = self.writes_per_pool_hour(usage.writes, usage.wall);
        let refresh = 3600.0 / (300.0 / interval.as_secs_f64()).ceil() / interval.as_secs_f64();
        let api_delta = request_delta(&api_before, &api_after);
        self.report.row(
            format!("status writes per pool-hour, healthy, quiet DB, {iv} interval"),
            format!(
                "{per_hour:.2} measured ({} writes seen by the watch, {api_delta} status \
                 requests counted by the apiserver, in {:.0} s) + {refresh:.0} from the 5m \
                 lastProbe refresh (formula) = {:.1}",
                usage.writes,
                usage.wall,
                per_hour + refresh
            ),
            "≤ 12",
            &verdict(per_hour + refresh <= 12.0 + 1e-9),
        );
    }

    /// Where the steady window's p99 comes from: a shared result's lateness is its stream's real
    /// probe's, so the note lists, per server, each real probe's start within the interval
    /// (its phase: streams whose phases lie close reconcile their owners together) and how much
    /// later than one interval after the previous real probe it finished.
    fn note_stream_probes(&mut self, op: u32, interval: std::time::Duration, from: i64, to: i64) {
        let step = i64::try_from(interval.as_micros())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut lines = Vec::new();
        for server in 0..self.s.targets as u32 {
            let mut real: Vec<_> = self
                .store
                .probes()
                .into_iter()
                .filter(|e| e.op == op && !e.shared && e.pool % self.s.targets as u32 == server)
                .filter(|e| e.start_us >= from && e.start_us <= to)
                .collect();
            real.sort_by_key(|e| e.start_us);
            let phases: Vec<String> = real
                .iter()
                .map(|e| format!("{:.0}", (e.start_us % step) as f64 / 1000.0))
                .collect();
            let drift: Vec<String> = real
                .windows(2)
                .map(|w| {
                    format!(
                        "{:+.1}",
                        (w[1].finish_us - w[0].finish_us - step) as f64 / 1000.0
                    )
                })
                .collect();
            lines.push(format!(
                "server {server}: starts at ms {} of the interval; finish − previous finish − \
                 interval (ms) {}",
                phases.join(", "),
                drift.join(", ")
            ));
        }
        self.report.note(format!(
            "steady window, real probes per stream: {}",
            lines.join("; ")
        ));
    }
}
