//! Force reopen: the annotation on the sample (breaker Open with a 10m openTimeout, database up)
//! until the watch sees Ready=True with the sample's token.
//!
//! Lives here: `Run::force_reopen`. Must not live here: the outage that opened their breakers
//! (`fault`).

use std::{collections::HashMap, time::Duration};

use dbpool_operator::api::FORCE_REOPEN_ANNOTATION;
use kube::api::{Patch, PatchParams};

use crate::{
    procfs::now_us,
    report::{show, stats, verdict},
    run::Run,
    store::pool_name,
    support::wait::wait_for,
};

impl Run {
    /// Annotates every pool of the sample and measures annotation → Ready=True.
    pub async fn force_reopen(&mut self) {
        let sample: Vec<u32> = self
            .all()
            .into_iter()
            .filter(|p| self.in_sample(*p))
            .collect();
        // Force reopen of the sample (breaker Open, database up, openTimeout 10m).
        let mut sent = Vec::new();
        for &p in &sample {
            let token = format!("bench-{}-{p}", self.generation);
            let body =
                serde_json::json!({"metadata": {"annotations": {FORCE_REOPEN_ANNOTATION: token}}});
            let at = now_us();
            self.api
                .patch(
                    &pool_name(p as usize),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .expect("annotate");
            sent.push((p, token, at));
        }
        let tokens: HashMap<u32, (String, i64)> = sent
            .iter()
            .map(|(p, t, at)| (*p, (t.clone(), *at)))
            .collect();
        wait_for(
            "the force-reopened pools Ready",
            Duration::from_secs(30),
            || {
                let ready = self.store.count_latest(&sample, |p, _, s| {
                    s.ready == Some(true)
                        && s.force_token.as_ref() == tokens.get(&p).map(|(t, _)| t)
                });
                std::future::ready((ready == sample.len()).then_some(()))
            },
        )
        .await;
        let obs = self.store.observations();
        let latencies: Vec<f64> = sample
            .iter()
            .filter_map(|p| {
                let (token, at) = tokens.get(p)?;
                obs.iter()
                    .find(|o| {
                        o.pool == *p
                            && o.at_us >= *at
                            && o.snap.ready == Some(true)
                            && o.snap.force_token.as_ref() == Some(token)
                    })
                    .map(|o| (o.at_us - at) as f64 / 1000.0)
            })
            .collect();
        let latency = stats(latencies);
        self.report.row(
            "force-reopen: annotation sent → watcher sees Ready=True (breaker Open, DB up)",
            show(latency),
            "≤ 1 s p99",
            &verdict(latency.is_some_and(|s| s.p99 <= 1000.0)),
        );
    }
}
