//! Probe coalescing: after a second restart (default settings), a window on the shared
//! connections, then every pool gets its own applicationName and a window on N connections.
//!
//! Lives here: `Run::coalescing`. Must not live here: the restart itself (`restart`).

use std::time::Duration;

use dbpool_operator::api::GoDuration;

use crate::{
    procfs::now_us,
    report::{show, stats},
    run::{Run, Usage},
    store::pool_name,
    support::wait::wait_for,
};

impl Run {
    /// N distinct application names (N connections) against shared connections.
    pub async fn coalescing(&mut self) {
        self.restart(Duration::from_secs(300), "second restart")
            .await;
        let per_target = self.n.div_ceil(self.s.targets);
        if !self.s.distinct || per_target > 400 {
            self.report.note(format!(
                "coalescing comparison skipped ({per_target} connections per server would be \
                 needed; BENCH_DISTINCT=0 or more than 400)"
            ));
            return;
        }
        let interval = self.s.fast_interval;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        // Shared connections, same operator configuration, for the comparison.
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (shared, _, _) = self.usage_end(begin);

        progress!("N={}: one application name per pool", self.n);
        let t_patch = now_us();
        self.patch_all(|i| {
            let name = format!("bench-{}", pool_name(i as usize));
            serde_json::json!({"spec": {"database": {"applicationName": name}}})
        })
        .await;
        self.wait_observed("every pool to observe its application name")
            .await;
        let op = self.generation;
        wait_for(
            "every pool on its own connection",
            interval + Duration::from_secs(60),
            || {
                let fresh = self.store.pools_probed(op, t_patch, |e| e.fresh);
                std::future::ready((fresh == self.n).then_some(()))
            },
        )
        .await;
        tokio::time::sleep(interval + Duration::from_secs(1)).await;
        let begin = self.usage_begin();
        tokio::time::sleep(self.s.window).await;
        let (own, from, to) = self.usage_end(begin);
        let late = stats(self.interval_lateness(op, interval, from, to));
        self.report.row(
            format!(
                "coalescing: {} pools on {} shared connections, {} interval",
                self.n,
                self.s.targets,
                GoDuration(interval)
            ),
            usage_cells(&shared),
            "",
            "",
        );
        self.report.row(
            format!(
                "coalescing: {} pools on {} connections (one application name each)",
                self.n, self.n
            ),
            format!("{}; schedule fidelity {}", usage_cells(&own), show(late)),
            "",
            "",
        );
    }
}

/// The result cell of a coalescing window.
fn usage_cells(u: &Usage) -> String {
    format!(
        "operator {:.3} s CPU per 1,000 results ({:.1} % of a core), VmRSS {:.1} MiB; \
         PostgreSQL {:.3} s CPU per 1,000 probes, {} server processes; {} fresh \
         connections, {} probes and {} shared results in the window",
        u.cpu_per_1000(),
        u.core_percent(),
        u.rss_kib as f64 / 1024.0,
        u.pg_cpu * 1000.0 / u.probes.max(1) as f64,
        u.pg_processes,
        u.fresh,
        u.probes,
        u.shared
    )
}
