//! Isolated faults: one pool failing at a time among N healthy ones, many times over.
//!
//! Lives here: `Run::isolated`: `BENCH_VICTIMS` pools (the last indices, outside the
//! force-reopen sample) are pointed at their own fault proxy in front of their server; each
//! victim then loops, staggered against the others: the proxy refuses and cuts its connections
//! (a real refusal by the kernel), the watch sees the breaker Open, the proxy passes again, the
//! watch sees Closed. `BENCH_ISOLATED_FAULTS` faults in all; the detection overhead of each
//! (watch receipt of Open − the crossing probe's `lastFailureTime`) is the row. Then the
//! victims go back to their server. Must not live here: the correlated outage (`fault`).

use std::time::Duration;

use dbpool_operator::api::{BreakerState, GoDuration, Phase};

use crate::{
    procfs::now_us,
    report::{show, stats, verdict},
    run::Run,
    settings::pool_policy,
    store::pool_name,
    support::{
        proxy::{FaultProxy, Mode},
        wait::wait_for,
    },
};

/// One isolated fault as it happened.
struct Fault {
    pool: u32,
    /// Before the proxy refused (µs).
    at_us: i64,
}

impl Run {
    /// The isolated-faults phase and its rows.
    pub async fn isolated(&mut self) {
        let victims: Vec<u32> = (0..self.n as u32)
            .rev()
            .filter(|p| !self.in_sample(*p))
            .take(self.s.victims)
            .collect();
        if victims.is_empty() {
            return;
        }
        let proxies = self.point_at_proxies(&victims).await;
        let per_victim = self.s.isolated_faults.div_ceil(victims.len());
        progress!(
            "N={}: isolated faults: {} pools, {per_victim} faults each",
            self.n,
            victims.len()
        );
        // Stagger the victims over one fault cycle, so crossings rarely coincide.
        let stagger = Duration::from_millis(2500) / victims.len() as u32;
        let this = &*self;
        let faults: Vec<Vec<Fault>> =
            futures::future::join_all(victims.iter().zip(&proxies).enumerate().map(
                |(k, (&pool, proxy))| async move {
                    tokio::time::sleep(stagger * k as u32).await;
                    let mut faults = Vec::new();
                    for _ in 0..per_victim {
                        faults.push(this.one_fault(pool, proxy).await);
                    }
                    faults
                },
            ))
            .await;
        let faults: Vec<Fault> = faults.into_iter().flatten().collect();
        self.report_isolated(&faults, victims.len());
        // Back to their own server, with the manifest's openTimeout.
        let open_timeout = GoDuration(pool_policy(self.s.steady_interval).open_timeout).to_string();
        self.patch_pools(&victims, |p| {
            Ok(serde_json::json!({"spec": {
                "database": {"port": self.pgs[self.target_of(p)].port()},
                "breaker": {"openTimeout": open_timeout},
            }}))
        })
        .await;
        drop(proxies);
    }

    /// Points `victims` at a fault proxy each (openTimeout 1s, so they close soon after).
    async fn point_at_proxies(&self, victims: &[u32]) -> Vec<FaultProxy> {
        let mut proxies = Vec::new();
        for &p in victims {
            let upstream = format!("127.0.0.1:{}", self.pgs[self.target_of(p)].port());
            proxies.push(FaultProxy::start(upstream.parse().expect("loopback address")).await);
        }
        let ports: Vec<u16> = proxies.iter().map(FaultProxy::port).collect();
        let since = now_us();
        self.patch_pools(victims, |p| {
            let k = victims.iter().position(|v| *v == p).unwrap_or(0);
            Ok(serde_json::json!({"spec": {
                "database": {"port": ports[k]},
                "breaker": {"openTimeout": "1s"},
            }}))
        })
        .await;
        wait_for(
            "the victims probing through their proxies",
            Duration::from_secs(60),
            || {
                let ok = self.store.count_latest(victims, |_, at, s| {
                    at >= since
                        && s.observed_generation == s.generation
                        && s.phase == Some(Phase::Healthy)
                });
                std::future::ready((ok == victims.len()).then_some(()))
            },
        )
        .await;
        wait_for(
            "every victim's probe connection through its proxy",
            Duration::from_secs(60),
            || {
                let connected = proxies.iter().filter(|p| p.live_connections() > 0).count();
                std::future::ready((connected == proxies.len()).then_some(()))
            },
        )
        .await;
        proxies
    }

    /// Applies a merge patch to each of `pools`.
    async fn patch_pools(
        &self,
        pools: &[u32],
        body: impl Fn(u32) -> Result<serde_json::Value, serde_json::Error>,
    ) {
        use kube::api::{Patch, PatchParams};
        for &p in pools {
            let body = body(p).expect("patch body");
            self.api
                .patch(
                    &pool_name(p as usize),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .expect("patch a victim");
        }
    }

    /// Refuses `pool`'s connections until the watch sees it Open, then passes until Closed.
    async fn one_fault(&self, pool: u32, proxy: &FaultProxy) -> Fault {
        let at_us = now_us();
        proxy.set_mode(Mode::Refuse).await;
        proxy.cut_all().await;
        wait_for("a victim Open", Duration::from_secs(30), || {
            let open = self.store.count_latest(&[pool], |_, at, s| {
                at >= at_us && s.breaker == Some(BreakerState::Open)
            });
            std::future::ready((open == 1).then_some(()))
        })
        .await;
        let passed = now_us();
        proxy.set_mode(Mode::Pass).await;
        wait_for("a victim Closed again", Duration::from_secs(30), || {
            let closed = self.store.count_latest(&[pool], |_, at, s| {
                at >= passed && s.breaker == Some(BreakerState::Closed)
            });
            std::future::ready((closed == 1).then_some(()))
        })
        .await;
        Fault { pool, at_us }
    }

    /// The rows: detection overhead of the isolated faults, split at the acknowledged write.
    fn report_isolated(&mut self, faults: &[Fault], victims: usize) {
        let obs = self.store.observations();
        let acks = self.store.acks();
        let (mut overhead, mut to_ack, mut ack_to_watch) = (Vec::new(), Vec::new(), Vec::new());
        for f in faults {
            let Some(open) = obs.iter().find(|o| {
                o.pool == f.pool && o.at_us >= f.at_us && o.snap.breaker == Some(BreakerState::Open)
            }) else {
                continue;
            };
            let Some(failed_at) = open.snap.last_failure_us else {
                continue;
            };
            overhead.push((open.at_us - failed_at) as f64 / 1000.0);
            if let Some((_, acked, _)) = acks.iter().find(|(p, at, phase)| {
                *p == f.pool && *at >= failed_at && *phase == Some(Phase::BreakerOpen)
            }) {
                to_ack.push((acked - failed_at) as f64 / 1000.0);
                ack_to_watch.push((open.at_us - acked) as f64 / 1000.0);
            }
        }
        let overhead = stats(overhead);
        self.report.row(
            format!(
                "detection overhead, one pool failing at a time among {} healthy ({} staggered \
                 faults on {victims} pools: the fault proxy refuses and cuts): crossing probe \
                 finished → watcher sees Open",
                self.n,
                faults.len()
            ),
            show(overhead),
            "≤ 100 ms p99",
            &verdict(overhead.is_some_and(|s| s.p99 <= 100.0)),
        );
        self.report.row(
            "… of which: crossing probe finished → status write acknowledged",
            show(stats(to_ack)),
            "",
            "",
        );
        self.report.row(
            "… of which: write acknowledged → watcher receives it",
            show(stats(ack_to_watch)),
            "",
            "",
        );
    }
}
