//! The fault: stop enough PostgreSQL servers to hit twice the force-reopen sample, wait until
//! every hit pool is Open, hold one more openTimeout, start them again, wait until the pools
//! outside the sample are Closed.
//!
//! Lives here: `Run::fault` with its figures: detection overhead (split at the operator's
//! acknowledged write), the failure path's schedule fidelity, time to Open and to Closed
//! against the theoretical schedule (the engine's own `backoff_delay` with the pools' policy).
//! Must not live here: the force reopen that follows (`force_reopen`).

use std::{collections::HashMap, time::Duration};

use dbpool_operator::{
    api::{BreakerState, GoDuration, Phase},
    recovery::Policy,
};

use crate::{
    apiserver::{ApiSample, apiserver_latency, apiserver_sample},
    phases::Together,
    procfs::{control_plane_cpu, now_us, us},
    report::{ratio, show, stats, verdict},
    run::Run,
    settings::{pool_backoff, pool_policy},
    store::{Obs, ProbeEvent, per_pool},
    support::wait::wait_for,
};

/// The outage as it happened: who it hit and when.
struct Outage {
    /// Pools whose server was stopped.
    affected: Vec<u32>,
    /// The affected pools outside the force-reopen sample (they close by themselves).
    others: Vec<u32>,
    /// Servers stopped (the first ones).
    down: usize,
    /// Before `pg_ctl stop` (µs).
    t_stop: i64,
    /// How long the stop took (µs).
    stopped_in: i64,
    /// After `pg_ctl start -w` returned (µs).
    t_started: i64,
    /// The apiserver's metrics before the stop and after the last pool closed.
    api: (Option<ApiSample>, Option<ApiSample>),
    /// Control-plane CPU seconds and wall seconds from the stop to the last pool Closed.
    control_plane: Option<(f64, f64)>,
}

/// Per affected pool: the figures of its way to Open.
#[derive(Default)]
struct OpenFigures {
    to_open: Vec<f64>,
    to_open_theory: Vec<f64>,
    open_late: Vec<f64>,
    overhead: Vec<f64>,
    to_ack: Vec<f64>,
    ack_to_watch: Vec<f64>,
    schedule: Vec<f64>,
    /// The earliest crossing and the latest Open seen (µs).
    first_crossing_us: Option<i64>,
    last_open_us: Option<i64>,
}

impl OpenFigures {
    /// The first crossing → the last Open seen, ms.
    fn span_ms(&self) -> f64 {
        match (self.first_crossing_us, self.last_open_us) {
            (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
            _ => f64::NAN,
        }
    }
}

/// Time to Closed of the pools outside the sample: measured, theoretical, late.
#[derive(Default)]
struct ClosedFigures {
    to_closed: Vec<f64>,
    to_closed_theory: Vec<f64>,
    closed_late: Vec<f64>,
}

impl Run {
    /// The fault phase and its rows.
    pub async fn fault(&mut self) {
        let op = self.op().generation;
        let outage = self.outage().await;
        let probes = per_pool(&self.store.probes(), self.n, op);
        let obs = self.store.observations();
        let mut since_stop: HashMap<u32, Vec<&Obs>> = HashMap::new();
        for o in obs.iter().filter(|o| o.at_us >= outage.t_stop) {
            since_stop.entry(o.pool).or_default().push(o);
        }
        let open = self.open_figures(&outage, &probes, &since_stop);
        self.together = Some(Together {
            pools: outage.affected.clone(),
            last_open_ms: open.overhead.iter().copied().fold(f64::NAN, f64::max),
            span_ms: open.span_ms(),
        });
        let closed = closed_figures(&outage, &since_stop);
        self.report_open(&outage, open);
        self.report_attempts(&outage, &probes);
        self.report_closed(&outage, closed);
    }

    /// Stops the servers, waits for Open, holds, starts them, waits for Closed.
    async fn outage(&mut self) -> Outage {
        let affected: Vec<u32> = self
            .all()
            .into_iter()
            .filter(|p| self.affected(*p))
            .collect();
        let others: Vec<u32> = affected
            .iter()
            .copied()
            .filter(|p| !self.in_sample(*p))
            .collect();
        let down = self.fault_targets();
        progress!(
            "N={}: fault: stopping {down} of {} PostgreSQL servers ({} pools)",
            self.n,
            self.s.targets,
            affected.len()
        );
        let api_before = apiserver_sample().await;
        let cp_before = control_plane_cpu();
        let t_stop = now_us();
        futures::future::join_all(self.pgs[..down].iter_mut().map(|pg| pg.stop())).await;
        let stopped_in = now_us() - t_stop;
        // Thousands of pools failing together wait for thousands of writes.
        let writes = Duration::from_millis(30) * affected.len() as u32;
        wait_for(
            "every affected pool Open",
            Duration::from_secs(60) + writes,
            || {
                let open = self.store.count_latest(&affected, |_, at, s| {
                    at >= t_stop && s.breaker == Some(BreakerState::Open)
                });
                std::future::ready((open == affected.len()).then_some(()))
            },
        )
        .await;
        // Hold the outage for one more openTimeout, so failed half-open trials are part of it.
        tokio::time::sleep(pool_policy(self.s.steady_interval).open_timeout).await;
        futures::future::join_all(self.pgs[..down].iter_mut().map(|pg| pg.start())).await;
        let t_started = now_us();
        progress!("N={}: fault: the servers are back", self.n);
        wait_for(
            "the affected pools Closed again",
            Duration::from_secs(60) + writes,
            || {
                let closed = self.store.count_latest(&others, |_, at, s| {
                    at >= t_started && s.breaker == Some(BreakerState::Closed)
                });
                std::future::ready((closed == others.len()).then_some(()))
            },
        )
        .await;
        let api_after = apiserver_sample().await;
        let control_plane = cp_before
            .zip(control_plane_cpu())
            .map(|(a, b)| (b - a, (now_us() - t_stop) as f64 / 1e6));
        Outage {
            affected,
            others,
            down,
            t_stop,
            stopped_in,
            t_started,
            api: (api_before, api_after),
            control_plane,
        }
    }

    /// Time to Open, detection overhead and the failure path's schedule of every affected pool.
    fn open_figures(
        &self,
        outage: &Outage,
        probes: &[Vec<ProbeEvent>],
        since_stop: &HashMap<u32, Vec<&Obs>>,
    ) -> OpenFigures {
        let t_stop = outage.t_stop;
        let acks = self.store.acks();
        let policy = pool_policy(self.s.steady_interval);
        let mut f = OpenFigures::default();
        for &p in &outage.affected {
            let Some(open) = since_stop.get(&p).and_then(|list| {
                list.iter()
                    .find(|o| o.snap.breaker == Some(BreakerState::Open))
                    .copied()
            }) else {
                continue;
            };
            f.to_open.push((open.at_us - t_stop) as f64 / 1000.0);
            f.last_open_us = f.last_open_us.max(Some(open.at_us));
            if let Some(failed_at) = open.snap.last_failure_us {
                f.first_crossing_us =
                    Some(f.first_crossing_us.map_or(failed_at, |a| a.min(failed_at)));
                f.overhead.push((open.at_us - failed_at) as f64 / 1000.0);
                // The operator's acknowledged write of that status splits the overhead.
                if let Some((_, acked, _)) = acks.iter().find(|(pool, at, phase)| {
                    *pool == p && *at >= failed_at && *phase == Some(Phase::BreakerOpen)
                }) {
                    f.to_ack.push((acked - failed_at) as f64 / 1000.0);
                    f.ack_to_watch.push((open.at_us - acked) as f64 / 1000.0);
                }
            }
            let events = &probes[p as usize];
            let theory = theoretical_open(events, t_stop, &policy);
            f.to_open_theory.push(theory as f64 / 1000.0);
            f.open_late
                .push((open.at_us - t_stop - theory) as f64 / 1000.0);
            f.schedule.extend(failure_schedule(events, t_stop, &policy));
        }
        f
    }

    /// The rows about the way to Open.
    fn report_open(&mut self, outage: &Outage, f: OpenFigures) {
        let overhead = stats(f.overhead);
        self.report.row(
            "detection overhead: crossing probe finished (lastFailureTime) → watcher sees Open",
            format!(
                "{}; apiserver-side latency of the status writes during the fault: {}",
                show(overhead),
                apiserver_latency(&outage.api.0, &outage.api.1)
            ),
            "≤ 100 ms p99",
            &verdict(overhead.is_some_and(|s| s.p99 <= 100.0)),
        );
        self.report.row(
            "… of which: crossing probe finished → status write acknowledged (operator's observer)",
            show(stats(f.to_ack)),
            "",
            "",
        );
        self.report.row(
            "… of which: write acknowledged → watcher receives it",
            show(stats(f.ack_to_watch)),
            "",
            "",
        );
        let schedule = stats(f.schedule);
        self.report.row(
            "schedule fidelity of the failure path (backoff delays, openTimeout)",
            show(schedule),
            "≤ 50 ms p99",
            &verdict(schedule.is_some_and(|s| s.p99 <= 50.0)),
        );
        let (open_m, open_t) = (stats(f.to_open), stats(f.to_open_theory));
        let threshold = pool_policy(self.s.steady_interval).failure_threshold;
        self.report.row(
            format!(
                "time to Open after `pg_ctl stop -m fast` of {} of {} servers ({} pools; \
                 threshold {threshold}, backoff {}, {}, …)",
                outage.down,
                self.s.targets,
                outage.affected.len(),
                GoDuration(pool_backoff(0)),
                GoDuration(pool_backoff(1))
            ),
            format!(
                "measured {}; theoretical {}; measured/theoretical p50 {:.2}; per pool, seen \
                 Open − theoretical: {}",
                show(open_m),
                show(open_t),
                ratio(open_m, open_t),
                show(stats(f.open_late))
            ),
            "",
            "",
        );
    }

    /// The rows about the way back to Closed, and the outage's notes.
    fn report_closed(&mut self, outage: &Outage, f: ClosedFigures) {
        let (closed_m, closed_t) = (stats(f.to_closed), stats(f.to_closed_theory));
        self.report.row(
            format!(
                "time to Closed after the server is back ({} pools; openTimeout {})",
                outage.others.len(),
                GoDuration(pool_policy(self.s.steady_interval).open_timeout)
            ),
            format!(
                "measured {}; theoretical (next half-open trial) {}; measured/theoretical p50 \
                 {:.2}; per pool, seen Closed − planned trial: {}",
                show(closed_m),
                show(closed_t),
                ratio(closed_m, closed_t),
                show(stats(f.closed_late))
            ),
            "",
            "",
        );
        self.report.note(format!(
            "fault: `pg_ctl stop -m fast` took {:.0} ms; time to Open counts from before it, \
             time to Closed from the end of `pg_ctl start -w`",
            outage.stopped_in as f64 / 1000.0
        ));
        if let Some((cpu, wall)) = outage.control_plane {
            self.report.note(format!(
                "fault: kube-apiserver + etcd used {cpu:.2} s CPU in the {wall:.1} s from the stop \
                 to the last pool Closed ({:.0} % of a core on average)",
                100.0 * cpu / wall
            ));
        }
    }
}

impl Run {
    /// The row about connect attempts against the stopped servers: every real probe of a pool
    /// on a stopped server while it was down (each is one connection attempt: the shared
    /// connection died with the server), per server, against the attempts one pool's schedule
    /// makes in the same span (the tightest policy of the owners: the pools outside the sample).
    fn report_attempts(&mut self, outage: &Outage, probes: &[Vec<ProbeEvent>]) {
        let policy = pool_policy(self.s.steady_interval);
        let mut ratios = Vec::new();
        let mut text = Vec::new();
        for server in 0..outage.down {
            let attempts: Vec<&ProbeEvent> = outage
                .affected
                .iter()
                .filter(|p| self.target_of(**p) == server)
                .flat_map(|p| probes[*p as usize].iter())
                .filter(|e| {
                    !e.ok
                        && !e.shared
                        && e.start_us >= outage.t_stop
                        && e.start_us < outage.t_started
                })
                .collect();
            let Some(first) = attempts.iter().map(|e| e.start_us).min() else {
                continue;
            };
            let span = outage.t_started - first;
            let single = single_pool_attempts(&policy, span);
            let ratio = attempts.len() as f64 / single as f64;
            ratios.push(ratio);
            let owners = outage
                .affected
                .iter()
                .filter(|p| self.target_of(**p) == server)
                .count();
            text.push(format!(
                "server {server}: {} attempts by {owners} pools in {:.1} s, one pool's schedule \
                 {single} ({ratio:.2}×)",
                attempts.len(),
                span as f64 / 1e6
            ));
        }
        let worst = ratios.iter().copied().fold(f64::NAN, f64::max);
        self.report.row(
            "K pools on one stopped server: connect attempts while it is down (real probes; \
             each opens a connection) against one pool's schedule over the same span",
            text.join("; "),
            "≤ 1.1×",
            &verdict(worst <= 1.1),
        );
    }
}

/// Attempts one pool makes against a dead server in `span_us` from its first failure: the
/// backoff delays until the threshold, then one half-open trial per openTimeout.
fn single_pool_attempts(policy: &Policy, span_us: i64) -> usize {
    let mut at = 0i64;
    let mut attempts = 1;
    let mut streak = 1usize;
    loop {
        let delay = if streak < policy.failure_threshold as usize {
            pool_backoff(streak - 1)
        } else {
            policy.open_timeout.max(pool_backoff(streak - 1))
        };
        at += us(delay);
        if at > span_us {
            return attempts;
        }
        attempts += 1;
        streak += 1;
    }
}

/// Time to Closed of the pools outside the sample: from the end of `pg_ctl start`, against the
/// next half-open trial the last Open status announced (`nextProbeAt`).
fn closed_figures(outage: &Outage, since_stop: &HashMap<u32, Vec<&Obs>>) -> ClosedFigures {
    let t_started = outage.t_started;
    let mut f = ClosedFigures::default();
    for &p in &outage.others {
        let list = since_stop.get(&p).cloned().unwrap_or_default();
        let Some(closed) = list
            .iter()
            .find(|o| o.at_us >= t_started && o.snap.breaker == Some(BreakerState::Closed))
        else {
            continue;
        };
        let planned = list
            .iter()
            .rev()
            .filter(|o| o.at_us < closed.at_us && o.snap.breaker == Some(BreakerState::Open))
            .find_map(|o| o.snap.next_probe_us)
            .unwrap_or(t_started)
            .max(t_started);
        f.to_closed.push((closed.at_us - t_started) as f64 / 1000.0);
        f.to_closed_theory
            .push((planned - t_started) as f64 / 1000.0);
        f.closed_late.push((closed.at_us - planned) as f64 / 1000.0);
    }
    f
}

/// Theoretical time (µs after the stop) until a pool is Open: the loss of the connection
/// triggers a probe at once, but not sooner than initialDelay after the previous one; then the
/// backoff delays until the threshold.
fn theoretical_open(events: &[ProbeEvent], t_stop: i64, policy: &Policy) -> i64 {
    let last_before = events
        .iter()
        .rev()
        .find(|e| e.finish_us < t_stop)
        .map_or(t_stop, |e| e.finish_us);
    let first = (last_before + us(policy.initial_delay) - t_stop).max(0);
    first
        + (0..policy.failure_threshold as usize - 1)
            .map(|i| us(pool_backoff(i)))
            .sum::<i64>()
}

/// Schedule fidelity (ms) of the failure path after the stop: each probe's start against the
/// previous failure's finish plus the backoff delay, then openTimeout once the threshold is
/// crossed (the sample's 10m openTimeout never comes due here).
fn failure_schedule(events: &[ProbeEvent], t_stop: i64, policy: &Policy) -> Vec<f64> {
    let after: Vec<&ProbeEvent> = events.iter().filter(|e| e.start_us >= t_stop).collect();
    let threshold = policy.failure_threshold as usize;
    let mut out = Vec::new();
    let mut streak = 0usize;
    for pair in after.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.ok {
            break;
        }
        streak += 1;
        let planned = if streak < threshold {
            pool_backoff(streak - 1)
        } else {
            policy.open_timeout.max(pool_backoff(streak - 1))
        };
        // A result taken instead of probing (a down target's latest attempt, or the stream's
        // result) is applied at its finish instant as the observer reports it: that is when
        // the pool acted on its deadline.
        let acted = if b.shared { b.finish_us } else { b.start_us };
        out.push((acted - a.finish_us - us(planned)) as f64 / 1000.0);
    }
    out
}
