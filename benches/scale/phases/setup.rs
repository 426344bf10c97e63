//! Setup: create the run's N pools (on the steady interval) and wait until every one is Healthy.
//!
//! Lives here: `Run::setup`, which also starts the run's first operator. Must not live here:
//! the pool manifest (`run`).

use std::time::{Duration, Instant};

use dbpool_operator::api::{DbPool, Phase};
use futures::StreamExt;
use kube::{ResourceExt, api::PostParams};

use crate::{run::Run, settings::API_CONCURRENCY, support::wait::wait_for};

impl Run {
    /// Starts the first operator, creates the pools, waits until all are Healthy.
    pub async fn setup(&mut self) {
        self.start_operator(Duration::from_secs(300)).await;
        let started = Instant::now();
        let api = &self.api;
        let manifests: Vec<DbPool> = self.all().into_iter().map(|i| self.manifest(i)).collect();
        futures::stream::iter(manifests)
            .map(|pool| async move {
                let name = pool.name_any();
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &pool).await {
                        Ok(_) => return,
                        Err(kube::Error::Api(s)) if s.code == 409 => return,
                        Err(err) if attempt < 4 => {
                            progress!("create {name}: {err}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(err) => panic!("create {name}: {err}"),
                    }
                }
            })
            .buffer_unordered(API_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
        let created = started.elapsed();
        progress!("N={}: {} pools created in {created:.1?}", self.n, self.n);
        let all = self.all();
        let deadline = Duration::from_secs(120) + Duration::from_millis(40) * self.n as u32;
        wait_for("every pool Healthy", deadline, || {
            let healthy = self
                .store
                .count_latest(&all, |_, _, s| s.phase == Some(Phase::Healthy));
            std::future::ready((healthy == self.n).then_some(()))
        })
        .await;
        let healthy = started.elapsed();
        self.report.row(
            "setup: create N pools, then all Healthy",
            format!(
                "created in {:.1} s ({:.0}/s); all Healthy {:.1} s after the first create",
                created.as_secs_f64(),
                self.n as f64 / created.as_secs_f64(),
                healthy.as_secs_f64()
            ),
            "",
            "",
        );
    }
}
