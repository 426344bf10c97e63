//! The soak's eyes during and after the nemesis: resource samples, the baseline and final
//! resource counts, and convergence after the last fault.
//!
//! Lives here: [`spawn_sampler`] (RSS and fds of every replica every 2s; sessions per target and
//! the leader's pool series every 10s), [`spawn_live_checks`] (the stale-write checker over the
//! audit log as it grows), [`resources`] (the counts the leak checker compares) and
//! [`converge`] (each pool's first instant showing the truth after the last fault, against its
//! stated bound). Must not live here: faults, judging.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use dbpool_api::DbPool;
use dbpool_soak::history::{Convergence, Ms};
use kube::{Api, ResourceExt};

use crate::{
    recorder::now_ms,
    world::{LEASE, World},
};

fn proc_value(pid: u32, what: &str) -> Option<f64> {
    match what {
        "rss_kib" => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        }
        _ => Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as f64),
    }
}

/// Pool-labelled series in a metrics text, and whether `pool` (`ns/name`) has any.
fn pool_series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains("name=\""))
        .count()
}

fn has_series(text: &str, key: &str) -> bool {
    let (ns, name) = key.split_once('/').unwrap_or(("", key));
    text.lines().any(|l| {
        !l.starts_with('#')
            && l.contains(&format!("name=\"{name}\""))
            && l.contains(&format!("namespace=\"{ns}\""))
    })
}

/// Samples until the world's clients stop.
pub fn spawn_sampler(world: Arc<World>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = 0u64;
        while !world.stop_clients.load(Ordering::Relaxed) {
            for r in &world.replicas {
                if let Some(pid) = r.pid() {
                    for what in ["rss_kib", "fds"] {
                        if let Some(v) = proc_value(pid, what) {
                            world.rec.sample(what, &r.subject(), v);
                        }
                    }
                }
            }
            let clients = world
                .client_pids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (name, pid) in clients {
                for what in ["rss_kib", "fds"] {
                    if let Some(v) = proc_value(pid, what) {
                        world.rec.sample(what, &name, v);
                    }
                }
            }
            if tick.is_multiple_of(5) {
                for t in &world.targets {
                    if let Some(n) = t.operator_sessions().await {
                        world.rec.sample("sessions", &t.name, n as f64);
                    }
                }
                if let Some(l) = world.leader(Duration::from_secs(1)).await
                    && let Some(text) = world.replicas[l].metrics().await
                {
                    let subject = world.replicas[l].subject();
                    world
                        .rec
                        .sample("series", &subject, pool_series(&text) as f64);
                }
            }
            tick += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// Resource counts now: operator sessions per target, the leader's fds, its pool series per live
/// pool, and the deleted pools it still has series of.
pub async fn resources(
    world: &World,
    deleted: &[String],
) -> (Vec<(String, i64)>, Option<f64>, Option<f64>, Vec<String>) {
    let mut sessions = Vec::new();
    for t in &world.targets {
        if let Some(n) = t.operator_sessions().await {
            sessions.push((t.name.clone(), n));
        }
    }
    let Some(l) = world.leader(Duration::from_secs(20)).await else {
        return (sessions, None, None, vec![]);
    };
    let replica = &world.replicas[l];
    let fds = replica.pid().and_then(|pid| proc_value(pid, "fds"));
    let text = replica.metrics().await.unwrap_or_default();
    let live = world.live(true).len().max(1) as f64;
    let per_pool = Some(pool_series(&text) as f64 / live);
    let stale = deleted
        .iter()
        .filter(|k| has_series(&text, k))
        .cloned()
        .collect();
    (sessions, fds, per_pool, stale)
}

/// The stated convergence bound: the longest interval, openTimeout and backoff maxDelay the
/// nemesis can set (5s, 4s, 2s), the cooldown (10s), the lease (4s), the write budget's
/// minimum status period (1s), and 30s for a loaded 2-core machine (three debug operators, the
/// control plane and three servers on two cores).
pub const CONVERGENCE_BOUND_MS: Ms =
    5_000 + 4_000 + 2_000 + 10_000 + LEASE.as_millis() as Ms + 1_000 + 30_000;

fn describe(p: &DbPool) -> (String, bool, bool) {
    let status = p.status.clone().unwrap_or_default();
    let phase = status
        .phase
        .map(|x| format!("{x:?}"))
        .unwrap_or_else(|| "-".into());
    let breaker = status
        .breaker
        .map(|b| format!("{:?}", b.state))
        .unwrap_or_else(|| "-".into());
    let applied = status.observed_generation == p.metadata.generation;
    let healthy = phase == "Healthy" && breaker == "Closed" && applied;
    let config_error = phase == "ConfigError";
    (
        format!(
            "{phase}/{breaker} gen {:?}/{:?}",
            status.observed_generation, p.metadata.generation
        ),
        healthy,
        config_error,
    )
}

/// Polls every live pool until each has shown the truth (Healthy, Closed, spec applied; an
/// isolated pool ConfigError), or the bound and a minute more have passed.
pub async fn converge(world: &World) -> Vec<Convergence> {
    let pools = world.live(true);
    let mut out: Vec<Convergence> = pools
        .iter()
        .map(|p| Convergence {
            pool: p.key.clone(),
            expected: if p.isolated {
                "ConfigError".into()
            } else {
                "Healthy/Closed".into()
            },
            observed: "-".into(),
            at: None,
            bound_ms: CONVERGENCE_BOUND_MS,
        })
        .collect();
    let deadline = now_ms() + CONVERGENCE_BOUND_MS + 60_000;
    let api: Api<DbPool> = Api::all(world.client.clone());
    while now_ms() < deadline && out.iter().any(|c| c.at.is_none()) {
        if let Ok(Ok(list)) =
            tokio::time::timeout(Duration::from_secs(10), api.list(&Default::default())).await
        {
            let t = now_ms();
            for p in list.items {
                let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                let Some(c) = out.iter_mut().find(|c| c.pool == key) else {
                    continue;
                };
                let (observed, healthy, config_error) = describe(&p);
                c.observed = observed;
                let good = if c.expected == "ConfigError" {
                    config_error
                } else {
                    healthy
                };
                if good && c.at.is_none() {
                    c.at = Some(t);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out
}

/// The cheap checker, live: every 10s, the audit log's new status writes are read and the
/// stale-write checker runs over all writes so far; a new violation is printed at once (the
/// verdict that counts is still the one at the end, over the whole history).
pub fn spawn_live_checks(
    world: Arc<World>,
    audit: std::path::PathBuf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut offset = 0usize;
        let mut history = dbpool_soak::history::History::default();
        let mut reported = 0usize;
        while !world.stop_clients.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let Ok(bytes) = std::fs::read(&audit) else {
                continue;
            };
            let Some(end) = bytes[offset.min(bytes.len())..]
                .iter()
                .rposition(|b| *b == b'\n')
            else {
                continue;
            };
            let fresh = &bytes[offset..offset + end + 1];
            offset += end + 1;
            for line in String::from_utf8_lossy(fresh).lines() {
                if let Some(dbpool_soak::audit::Record::Status(w)) =
                    dbpool_soak::audit::parse_line(line)
                {
                    history.writes.push(w);
                }
            }
            let violations = dbpool_soak::checks::check_stale_writes(&history);
            for v in violations.iter().skip(reported) {
                eprintln!(
                    "[soak] LIVE VIOLATION seed={} checker={} subject={}: {}",
                    world.seed, v.checker, v.subject, v.message
                );
            }
            reported = reported.max(violations.len());
        }
    })
}
