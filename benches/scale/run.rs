//! One run of N pools: its namespace, servers, watch, operator and report, and the helpers the
//! phases share.
//!
//! Lives here: [`Run`] (creation, which pools the fault hits and which form the force-reopen
//! sample, the pool manifest, patching every pool, usage windows, lateness, and
//! [`Run::execute`], which runs the phases in order and cleans up; a run with only the
//! `recovery` phase starts no servers and creates no pools of its own), [`Usage`]. Must not live
//! here: the phases themselves (`phases::*`), process and /proc details (`operator`,
//! `procfs`).

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use dbpool_operator::api::{DbPool, GoDuration};
use futures::StreamExt;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use tokio::task::JoinHandle;

use crate::{
    operator::Operator,
    phases::Together,
    procfs::{control_plane_cpu, now_us, postgres_usage, us},
    report::Report,
    settings::{API_CONCURRENCY, KEY, LONG_OPEN_TIMEOUT, Mode, SECRET, Settings, pool_policy},
    store::{Store, per_pool, pool_name, watch_pools},
    support::{
        self,
        kube::{TestNamespace, create_consenting_secret},
        postgres::{APP_PASSWORD, PgServer},
        wait::wait_for,
    },
};

/// One N: everything the phases share.
pub struct Run {
    /// The bench's settings.
    pub s: Settings,
    /// Pools in this run.
    pub n: usize,
    ns: Option<TestNamespace>,
    /// The run's DbPools.
    pub api: Api<DbPool>,
    /// What the run observed.
    pub store: Arc<Store>,
    /// The PostgreSQL servers; pool *i* probes `pgs[i % targets]`.
    pub pgs: Vec<PgServer>,
    /// The operator currently running, if any.
    pub op: Option<Operator>,
    /// Generation of the latest operator started.
    pub generation: u32,
    /// The run's table.
    pub report: Report,
    watch: JoinHandle<()>,
    log_dir: PathBuf,
    /// kube-apiserver + etcd CPU seconds per second in a window without status writes.
    pub control_plane_idle: Option<f64>,
    /// What the fault phase saw, for the floor phase's comparison.
    pub together: Option<Together>,
}

/// Resource usage of the operator and the servers over a window.
pub struct Usage {
    /// Window length, seconds.
    pub wall: f64,
    /// Operator CPU seconds.
    pub cpu: f64,
    /// Probes the operator finished in the window (real ones).
    pub probes: usize,
    /// Results of a pool's probe stream taken instead of probing, in the window.
    pub shared: usize,
    /// PostgreSQL CPU seconds.
    pub pg_cpu: f64,
    /// PostgreSQL server processes at the end.
    pub pg_processes: usize,
    /// Operator VmHWM at the end, KiB.
    pub hwm_kib: u64,
    /// Operator VmRSS at the end, KiB.
    pub rss_kib: u64,
    /// Status writes the watch saw.
    pub writes: usize,
    /// Probes on a fresh connection.
    pub fresh: usize,
    /// kube-apiserver + etcd CPU seconds.
    pub control_plane: Option<f64>,
}

impl Usage {
    /// Operator CPU seconds per 1,000 pool results (real probes and shared results: each is
    /// one pool's scheduled check, one reconcile).
    pub fn cpu_per_1000(&self) -> f64 {
        let results = self.probes + self.shared;
        if results == 0 {
            f64::NAN
        } else {
            self.cpu * 1000.0 / results as f64
        }
    }

    /// Operator CPU as a percentage of one core.
    pub fn core_percent(&self) -> f64 {
        100.0 * self.cpu / self.wall
    }
}

impl Run {
    /// Starts the run's namespace, Secret, servers and watch (no operator yet).
    pub async fn new(s: &Settings, n: usize, client: Client) -> Self {
        let ns = TestNamespace::with_prefix(&client, &format!("bench-{n}")).await;
        create_consenting_secret(
            &client,
            ns.name(),
            SECRET,
            KEY,
            APP_PASSWORD,
            &["127.0.0.1"],
        )
        .await;
        let per_target = n.div_ceil(s.targets);
        let max_connections = u32::try_from(per_target + 60).unwrap_or(u32::MAX).max(100);
        if s.needs_pools() {
            progress!(
                "N={n}: starting {} PostgreSQL servers (max_connections {max_connections})",
                s.targets
            );
        }
        let servers = if s.needs_pools() { s.targets } else { 0 };
        let pgs = futures::future::join_all(
            (0..servers).map(|_| PgServer::options().max_connections(max_connections).start()),
        )
        .await;
        let store = Arc::new(Store::new(n));
        let api: Api<DbPool> = Api::namespaced(client.clone(), ns.name());
        let watch = tokio::spawn(watch_pools(api.clone(), store.clone()));
        let log_dir = std::env::var_os("DBPOOL_ENV_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&log_dir).expect("log directory");
        let title = format!(
            "{}, operator {}",
            if s.needs_pools() {
                format!("N = {n}: {} PostgreSQL targets", s.targets)
            } else {
                "recovery phase (pools and servers of its own)".to_owned()
            },
            match s.mode {
                Mode::Child => "in a child process (controller::run)",
                Mode::InProcess => "in-process (controller::run on its own runtime)",
            }
        );
        Self {
            s: s.clone(),
            n,
            api,
            ns: Some(ns),
            store,
            pgs,
            op: None,
            generation: 0,
            report: Report::new(title),
            watch,
            log_dir,
            control_plane_idle: None,
            together: None,
        }
    }

    /// Every pool index.
    pub fn all(&self) -> Vec<u32> {
        (0..self.n as u32).collect()
    }

    /// The server pool `pool` probes.
    pub fn target_of(&self, pool: u32) -> usize {
        pool as usize % self.s.targets
    }

    /// How many servers the fault phase stops (the first ones): enough for the force-reopen
    /// sample and as many pools again to watch closing by themselves.
    pub fn fault_targets(&self) -> usize {
        let per_target = self.n.div_ceil(self.s.targets).max(1);
        (2 * self.s.sample)
            .div_ceil(per_target)
            .clamp(1, self.s.targets)
    }

    /// Whether the fault phase takes `pool`'s server down.
    pub fn affected(&self, pool: u32) -> bool {
        self.target_of(pool) < self.fault_targets()
    }

    /// The force-reopen sample: the first affected pools, created with a 10m openTimeout.
    pub fn in_sample(&self, pool: u32) -> bool {
        let (k, f) = (self.s.targets, self.fault_targets());
        let affected = (0..self.n as u32).filter(|p| self.affected(*p)).count();
        let sample = self.s.sample.min(affected / 2).max(1);
        let rank = (pool as usize / k) * f + pool as usize % k;
        self.affected(pool) && rank < sample
    }

    /// The running operator.
    pub fn op(&self) -> &Operator {
        self.op.as_ref().expect("an operator runs")
    }

    /// Starts the next operator generation with `refresh`; returns its start instant (µs).
    pub async fn start_operator(&mut self, refresh: Duration) -> i64 {
        self.generation += 1;
        let started = now_us();
        let ns = self.ns.as_ref().expect("namespace").name().to_owned();
        self.op = Some(
            Operator::start(
                self.s.mode,
                self.generation,
                &ns,
                refresh,
                &self.store,
                &self.log_dir,
            )
            .await,
        );
        started
    }

    /// Pool `i`'s manifest: the policy of `settings::pool_policy`, the sample's long
    /// openTimeout.
    pub fn manifest(&self, i: u32) -> DbPool {
        let p = pool_policy(self.s.steady_interval);
        let open_timeout = if self.in_sample(i) {
            LONG_OPEN_TIMEOUT.to_owned()
        } else {
            GoDuration(p.open_timeout).to_string()
        };
        let d = |d: Duration| GoDuration(d).to_string();
        support::pools::pool(
            &pool_name(i as usize),
            self.pgs[self.target_of(i)].port(),
            Some((SECRET, KEY)),
            serde_json::json!({
                "pool": {"minSize": 1, "maxSize": 5},
                "healthCheck": {"interval": d(p.interval), "timeout": d(p.timeout)},
                "backoff": {
                    "initialDelay": d(p.initial_delay), "multiplier": p.multiplier,
                    "maxDelay": d(p.max_delay), "maxAttempts": p.max_attempts,
                    "cooldown": d(p.cooldown), "jitter": p.jitter,
                },
                "breaker": {
                    "failureThreshold": p.failure_threshold, "openTimeout": open_timeout,
                    "successThreshold": p.success_threshold,
                },
            }),
        )
    }

    /// Applies a JSON merge patch to every pool, a few at a time; returns when all are written.
    pub async fn patch_all(&self, patch: impl Fn(u32) -> serde_json::Value) {
        let api = &self.api;
        let patch = &patch;
        futures::stream::iter(self.all())
            .map(|i| async move {
                let name = pool_name(i as usize);
                let body = patch(i);
                for attempt in 0..5 {
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                        .await
                    {
                        Ok(_) => return,
                        Err(err) if attempt < 4 => {
                            progress!("patch {name}: {err}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(err) => panic!("patch {name}: {err}"),
                    }
                }
            })
            .buffer_unordered(API_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    /// Waits until every pool's status shows its current generation.
    pub async fn wait_observed(&self, what: &str) {
        let all = self.all();
        let deadline = Duration::from_secs(60) + Duration::from_millis(40) * self.n as u32;
        wait_for(what, deadline, || {
            let done = self.store.count_latest(&all, |_, _, s| {
                s.generation.is_some() && s.observed_generation == s.generation
            });
            std::future::ready((done == self.n).then_some(()))
        })
        .await;
    }

    /// Starts a usage window: (instant µs, operator CPU, PostgreSQL CPU, control-plane CPU).
    pub fn usage_begin(&self) -> (i64, f64, f64, Option<f64>) {
        let (pg_cpu, _) = postgres_usage(&self.postmasters());
        (
            now_us(),
            self.op().cpu_seconds(),
            pg_cpu,
            control_plane_cpu(),
        )
    }

    /// Ends a usage window: the usage and the window's bounds (µs).
    pub fn usage_end(&self, begin: (i64, f64, f64, Option<f64>)) -> (Usage, i64, i64) {
        let (from_us, cpu0, pg0, cp0) = begin;
        let to_us = now_us();
        let cpu = self.op().cpu_seconds() - cpu0;
        let (pg_cpu, pg_processes) = postgres_usage(&self.postmasters());
        let (hwm_kib, rss_kib) = self.op().memory_kib();
        let generation = self.op().generation;
        let fresh = self
            .store
            .probes()
            .iter()
            .filter(|e| e.op == generation && e.fresh && e.finish_us >= from_us)
            .count();
        (
            Usage {
                wall: (to_us - from_us) as f64 / 1e6,
                cpu,
                probes: self.store.probe_count(generation, from_us, to_us),
                shared: self.store.shared_count(generation, from_us, to_us),
                pg_cpu: pg_cpu - pg0,
                pg_processes,
                hwm_kib,
                rss_kib,
                writes: self.store.status_writes(from_us, to_us),
                fresh,
                control_plane: cp0.zip(control_plane_cpu()).map(|(a, b)| b - a),
            },
            from_us,
            to_us,
        )
    }

    /// Pids of the servers' postmasters.
    fn postmasters(&self) -> Vec<u32> {
        self.pgs.iter().filter_map(|p| p.postmaster_pid()).collect()
    }

    /// Lateness (ms) of every probe of operator `op` that started in [from, to] after a successful
    /// result of the same pool: start − (previous finish + interval). A result taken from the
    /// pool's probe stream counts at its finish (when the pool had it); negative values are a
    /// pool planning earlier onto its stream's grid.
    pub fn interval_lateness(
        &self,
        op: u32,
        interval: Duration,
        from_us: i64,
        to_us: i64,
    ) -> Vec<f64> {
        let per_pool = per_pool(&self.store.probes(), self.n, op);
        let mut out = Vec::new();
        for events in &per_pool {
            for pair in events.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                // A shared result counts at the instant it finished: when the pool had it.
                let acted = if b.shared { b.finish_us } else { b.start_us };
                if a.ok && acted >= from_us && acted <= to_us {
                    out.push((acted - a.finish_us - us(interval)) as f64 / 1000.0);
                }
            }
        }
        out
    }

    /// "kube-apiserver + etcd: x s CPU (y % of a core)[, ≈ z ms per status write]".
    pub fn control_plane(&self, u: &Usage) -> String {
        let Some(cpu) = u.control_plane else {
            return "kube-apiserver + etcd CPU n/a (no DBPOOL_ENV_DIR pid files)".to_owned();
        };
        let mut text = format!(
            "kube-apiserver + etcd {cpu:.2} s CPU ({:.1} % of a core)",
            100.0 * cpu / u.wall
        );
        if let Some(idle) = self.control_plane_idle
            && u.writes > 0
        {
            let per_write = (cpu - idle * u.wall) * 1000.0 / u.writes as f64;
            let _ = write!(
                text,
                ", ≈ {per_write:.1} ms CPU per status write above idle"
            );
        }
        text
    }

    /// Status writes per pool-hour of `writes` in `wall` seconds.
    pub fn writes_per_pool_hour(&self, writes: usize, wall: f64) -> f64 {
        writes as f64 * 3600.0 / (self.n as f64 * wall)
    }

    /// Runs the phases the settings ask for, then kills the operator and cleans up.
    pub async fn execute(mut self) -> Report {
        let t0 = Instant::now();
        let phase = |name: &str| self.s.phases.iter().any(|p| p == name);
        let (steady, fast, fault) = (phase("steady"), phase("fast"), phase("fault"));
        let (isolated, floor) = (phase("isolated"), phase("floor"));
        let (restart, coalescing) = (phase("restart"), phase("coalescing"));
        let recovery = phase("recovery");
        if self.s.needs_pools() {
            self.setup().await;
        }
        if steady {
            self.steady().await;
        }
        if fast {
            self.fast().await;
        }
        if isolated {
            self.isolated().await;
        }
        if fault {
            self.fault().await;
            self.force_reopen().await;
        }
        if restart {
            self.restart_short_refresh().await;
        }
        if coalescing {
            self.coalescing().await;
        }
        if recovery {
            self.recovery().await;
        }
        if floor {
            // Last: it stops the operator and overwrites the statuses of the pools it writes.
            self.floor().await;
        }
        let relists = self.store.relists.load(Ordering::Relaxed);
        if relists > 1 {
            self.report.note(format!(
                "the bench's watch relisted {} times: a few status writes may be missing from \
                 the counts",
                relists - 1
            ));
        }
        self.report
            .note(format!("run took {:.0} s", t0.elapsed().as_secs_f64()));
        progress!("operator logs in {}", self.log_dir.display());
        if let Some(op) = self.op.take() {
            op.kill().await;
        }
        self.watch.abort();
        // Without kube-controller-manager a deleted namespace keeps its objects: delete the
        // pools, so the next run's apiserver does not carry them.
        if let Err(err) = self
            .api
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
        {
            progress!("deleting the pools: {err}");
        }
        if let Some(ns) = self.ns.take() {
            ns.cleanup().await;
        }
        self.report
    }
}
