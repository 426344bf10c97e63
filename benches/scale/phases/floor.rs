//! The apiserver's own floor for N status writes, measured at the end of the run with the
//! operator stopped, against what the operator did when the fault phase's N pools failed
//! together.
//!
//! Lives here: `Run::floor`: kill the operator, then one client (this bench) server-side-applies
//! one status to each of the N pools the fault hit, `--max-concurrent-api-requests` (16) at a
//! time, each an Open status like the operator's with a fresh `lastFailureTime`; the floor is
//! from the first request sent until the watch has seen every one of them. The row compares the
//! fault phase's last Open (the largest crossing → seen Open of the N pools) with 1.5× that
//! floor. Must not live here: the fault itself (`fault`).

use std::{collections::HashSet, time::Duration};

use dbpool_operator::{
    api::{BreakerState, DbPool, DbPoolStatus, Phase},
    cli::defaults::MAX_CONCURRENT_API_REQUESTS,
};
use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};
use kube::api::{ListParams, Patch, PatchParams};

use crate::{
    procfs::now_us,
    report::{ms, verdict},
    run::Run,
    store::pool_index,
    support::wait::wait_for,
};

/// What the fault phase saw when its pools failed together.
pub struct Together {
    /// The pools whose server was stopped.
    pub pools: Vec<u32>,
    /// The largest crossing probe → watch sees Open among them (ms).
    pub last_open_ms: f64,
    /// The first crossing among them → the last Open seen (ms).
    pub span_ms: f64,
}

impl Run {
    /// The floor phase and its row (needs the fault phase's figures).
    pub async fn floor(&mut self) {
        let Some(together) = self.together.take() else {
            return;
        };
        if let Some(op) = self.op.take() {
            op.kill().await;
        }
        let statuses = self.floor_statuses(&together.pools).await;
        let n = statuses.len();
        progress!("N={}: floor: {n} status writes by one client", self.n);
        let marker = Timestamp::now();
        let marker_us = marker.as_microsecond();
        let t0 = now_us();
        let api = &self.api;
        let params = PatchParams::apply("bench-floor").force();
        futures::stream::iter(statuses)
            .map(|(name, mut status)| {
                let params = &params;
                status.last_failure_time = Some(MicroTime(marker));
                async move {
                    let body = serde_json::json!({
                        "apiVersion": "dbpool.io/v1alpha1",
                        "kind": "DbPool",
                        "status": status,
                    });
                    api.patch_status(&name, params, &Patch::Apply(&body))
                        .await
                        .map(|_| ())
                        .map_err(|err| progress!("floor write {name}: {err}"))
                }
            })
            .buffer_unordered(MAX_CONCURRENT_API_REQUESTS)
            .collect::<Vec<_>>()
            .await;
        let acked = now_us();
        wait_for(
            "the watch seeing every floor write",
            Duration::from_secs(120),
            || {
                let seen = self.store.count_latest(&together.pools, |_, _, s| {
                    s.last_failure_us == Some(marker_us)
                });
                std::future::ready((seen == n).then_some(()))
            },
        )
        .await;
        let last_seen = self
            .store
            .observations()
            .iter()
            .filter(|o| o.at_us >= t0 && o.snap.last_failure_us == Some(marker_us))
            .map(|o| o.at_us)
            .max()
            .unwrap_or(acked);
        let floor_ms = (last_seen - t0) as f64 / 1000.0;
        let per_write = floor_ms / n.max(1) as f64;
        self.report.row(
            format!(
                "{n} pools failing together: the last Open visible (largest crossing → watcher \
                 sees Open) against the apiserver's floor for {n} status writes (one client, \
                 operator stopped, {MAX_CONCURRENT_API_REQUESTS} at a time, first sent → last \
                 seen by the watch)"
            ),
            format!(
                "operator {} (first crossing → last Open seen: {}); floor {} ({:.2} ms per \
                 write; all acknowledged after {}); ratio {:.2}",
                ms(together.last_open_ms),
                ms(together.span_ms),
                ms(floor_ms),
                per_write,
                ms((acked - t0) as f64 / 1000.0),
                together.last_open_ms / floor_ms
            ),
            "≤ 1.5 × floor",
            &verdict(together.last_open_ms <= 1.5 * floor_ms),
        );
    }

    /// Each pool's current status as an Open one (from one list), by name.
    async fn floor_statuses(&self, pools: &[u32]) -> Vec<(String, DbPoolStatus)> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .expect("list the pools");
        let wanted: HashSet<u32> = pools.iter().copied().collect();
        list.items
            .into_iter()
            .filter_map(|p: DbPool| {
                let name = p.metadata.name?;
                let mut status = p.status?;
                if !pool_index(&name).is_some_and(|i| wanted.contains(&i)) {
                    return None;
                }
                status.phase = Some(Phase::BreakerOpen);
                if let Some(breaker) = status.breaker.as_mut() {
                    breaker.state = BreakerState::Open;
                }
                Some((name, status))
            })
            .collect()
    }
}
