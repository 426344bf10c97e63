//! What the bench saw: probe events and status-write acknowledgements from the operator (through
//! `capture`), and the watch's view of every pool.
//!
//! Lives here: [`ProbeEvent`], [`Snap`] / [`Obs`] (a pool's status as the watch received it),
//! [`Store`] (everything of one run, behind mutexes) and [`watch_pools`]. Must not live here:
//! how the operator's observations reach the store (`capture`), or any statistics over them
//! (the phases).

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use dbpool_operator::api::{BreakerState, CONDITION_READY, DbPool, Phase};
use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use crate::procfs::{micro, now_us};

/// One probe of one pool, or one result of its probe stream it took instead (`shared`), as the
/// operator's observer reported it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeEvent {
    /// Which operator (generation) ran it.
    pub op: u32,
    /// The pool's index (pNNNNN).
    pub pool: u32,
    /// Probe start = finish − latency (µs since the epoch).
    pub start_us: i64,
    /// When the probe's result reached the controller (µs since the epoch).
    pub finish_us: i64,
    /// Whether the probe succeeded.
    pub ok: bool,
    /// Whether it opened a new connection.
    pub fresh: bool,
    /// Whether it is another pool's equivalent probe, taken instead of probing: no probe ran,
    /// `finish_us` is when the real one finished (the pool plans its next probe from it).
    pub shared: bool,
}

impl ProbeEvent {
    /// An event from the observer's figures; the latency is whole milliseconds.
    pub fn new(
        op: u32,
        pool: u32,
        finish_us: i64,
        latency_ms: u64,
        ok: bool,
        fresh: bool,
        shared: bool,
    ) -> Self {
        let latency_us = i64::try_from(latency_ms.saturating_mul(1000)).unwrap_or(0);
        Self {
            op,
            pool,
            start_us: finish_us - latency_us,
            finish_us,
            ok,
            fresh,
            shared,
        }
    }
}

/// A pool's status as the watcher saw it.
#[derive(Clone, Debug, Default)]
pub struct Snap {
    /// `status.phase`.
    pub phase: Option<Phase>,
    /// `status.breaker.state`.
    pub breaker: Option<BreakerState>,
    /// `status.breaker.nextProbeAt` (µs).
    pub next_probe_us: Option<i64>,
    /// `status.lastFailureTime` (µs).
    pub last_failure_us: Option<i64>,
    /// Whether the Ready condition is True.
    pub ready: Option<bool>,
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status.lastForceReopen.token`.
    pub force_token: Option<String>,
}

impl Snap {
    /// The snapshot of `pool`'s status.
    pub fn of(pool: &DbPool) -> Self {
        let status = pool.status.as_ref();
        let breaker = status.and_then(|s| s.breaker.as_ref());
        Self {
            phase: status.and_then(|s| s.phase),
            breaker: breaker.map(|b| b.state),
            next_probe_us: breaker.and_then(|b| b.next_probe_at.as_ref()).map(micro),
            last_failure_us: status.and_then(|s| s.last_failure_time.as_ref()).map(micro),
            ready: status.and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == CONDITION_READY)
                    .map(|c| c.status == "True")
            }),
            observed_generation: status.and_then(|s| s.observed_generation),
            generation: pool.metadata.generation,
            force_token: status
                .and_then(|s| s.last_force_reopen.as_ref())
                .map(|r| r.token.clone()),
        }
    }
}

/// One watch event of one pool.
#[derive(Clone, Debug)]
pub struct Obs {
    /// Receipt instant (µs).
    pub at_us: i64,
    /// The pool's index.
    pub pool: u32,
    /// Whether the status differs from the previous event's (a status write).
    pub status_changed: bool,
    /// The status received.
    pub snap: Snap,
}

/// Everything a run observed: probe events (from the operator) and watch events (apiserver).
pub struct Store {
    /// Pools in the run.
    pub n: usize,
    probes: Mutex<Vec<ProbeEvent>>,
    /// Status writes the apiserver acknowledged: (pool, instant µs, phase written).
    acks: Mutex<Vec<(u32, i64, Option<Phase>)>>,
    obs: Mutex<Vec<Obs>>,
    latest: Mutex<Vec<Option<(i64, Snap)>>>,
    /// Times the watch (re)listed.
    pub relists: AtomicU32,
}

/// The name of pool `i`.
pub fn pool_name(i: usize) -> String {
    format!("p{i:05}")
}

/// The pool index of an owner key "namespace/pNNNNN".
pub fn pool_index(owner: &str) -> Option<u32> {
    owner.rsplit('/').next()?.strip_prefix('p')?.parse().ok()
}

impl Store {
    /// An empty store for `n` pools.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            probes: Mutex::new(Vec::with_capacity(n * 64)),
            acks: Mutex::new(Vec::new()),
            obs: Mutex::new(Vec::with_capacity(n * 16)),
            latest: Mutex::new(vec![None; n]),
            relists: AtomicU32::new(0),
        }
    }

    /// Records a probe (of a pool of this run).
    pub fn push_probe(&self, event: ProbeEvent) {
        if (event.pool as usize) < self.n
            && let Ok(mut probes) = self.probes.lock()
        {
            probes.push(event);
        }
    }

    /// Records an acknowledged status write (of a pool of this run).
    pub fn push_ack(&self, pool: u32, at_us: i64, phase: Option<Phase>) {
        if (pool as usize) < self.n
            && let Ok(mut acks) = self.acks.lock()
        {
            acks.push((pool, at_us, phase));
        }
    }

    /// Status writes the operator saw acknowledged: (pool, instant µs, phase written).
    pub fn acks(&self) -> Vec<(u32, i64, Option<Phase>)> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Every probe event so far.
    pub fn probes(&self) -> Vec<ProbeEvent> {
        self.probes.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Every watch event so far.
    pub fn observations(&self) -> Vec<Obs> {
        self.obs.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Pools with a probe by operator `op` that started at or after `since_us` and matches `pred`.
    pub fn pools_probed(
        &self,
        op: u32,
        since_us: i64,
        pred: impl Fn(&ProbeEvent) -> bool,
    ) -> usize {
        let probes = self.probes.lock().expect("probe store");
        let mut seen = vec![false; self.n];
        for e in probes.iter().rev() {
            // Events arrive in finish order (give or take a flush): stop well before `since_us`.
            if e.finish_us < since_us - 5_000_000 {
                break;
            }
            if e.op == op && e.start_us >= since_us && pred(e) {
                seen[e.pool as usize] = true;
            }
        }
        seen.iter().filter(|s| **s).count()
    }

    /// Number of pools whose latest watched state satisfies `check(at, snap)`, among `pools`.
    pub fn count_latest(&self, pools: &[u32], check: impl Fn(u32, i64, &Snap) -> bool) -> usize {
        let latest = self.latest.lock().expect("latest store");
        pools
            .iter()
            .filter(|p| {
                latest
                    .get(**p as usize)
                    .and_then(|l| l.as_ref())
                    .is_some_and(|(at, snap)| check(**p, *at, snap))
            })
            .count()
    }

    /// Status writes seen by the watch between two instants.
    pub fn status_writes(&self, from_us: i64, to_us: i64) -> usize {
        self.obs
            .lock()
            .map(|o| {
                o.iter()
                    .filter(|o| o.status_changed && o.at_us >= from_us && o.at_us <= to_us)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Real probes (not shared results) of operator `op` that finished in [from, to].
    pub fn probe_count(&self, op: u32, from_us: i64, to_us: i64) -> usize {
        self.event_count(op, from_us, to_us, false)
    }

    /// Shared results operator `op` applied (taken instead of probing) in [from, to].
    pub fn shared_count(&self, op: u32, from_us: i64, to_us: i64) -> usize {
        self.event_count(op, from_us, to_us, true)
    }

    fn event_count(&self, op: u32, from_us: i64, to_us: i64, shared: bool) -> usize {
        self.probes
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|e| {
                        e.op == op
                            && e.shared == shared
                            && e.finish_us >= from_us
                            && e.finish_us <= to_us
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Watches the run's DbPools and records every change with its receipt instant.
pub async fn watch_pools(api: Api<DbPool>, store: Arc<Store>) {
    let mut previous: HashMap<u32, u64> = HashMap::new();
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let at_us = now_us();
        let pool = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
            Ok(watcher::Event::Init) => {
                store.relists.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(_) => continue,
            Err(err) => {
                progress!("watch error (the watch restarts): {err}");
                continue;
            }
        };
        let Some(index) = pool_index(&pool.name_any()) else {
            continue;
        };
        if index as usize >= store.n {
            continue;
        }
        let mut hasher = DefaultHasher::new();
        serde_json::to_string(&pool.status)
            .unwrap_or_default()
            .hash(&mut hasher);
        let hash = hasher.finish();
        let status_changed =
            pool.status.is_some() && previous.insert(index, hash).is_none_or(|old| old != hash);
        let snap = Snap::of(&pool);
        if let Ok(mut latest) = store.latest.lock() {
            latest[index as usize] = Some((at_us, snap.clone()));
        }
        if let Ok(mut obs) = store.obs.lock() {
            obs.push(Obs {
                at_us,
                pool: index,
                status_changed,
                snap,
            });
        }
    }
}

/// The probes of operator `op`, per pool, in finish order.
pub fn per_pool(events: &[ProbeEvent], n: usize, op: u32) -> Vec<Vec<ProbeEvent>> {
    let mut out = vec![Vec::new(); n];
    for e in events.iter().filter(|e| e.op == op) {
        if let Some(list) = out.get_mut(e.pool as usize) {
            list.push(*e);
        }
    }
    for list in &mut out {
        list.sort_by_key(|e| e.finish_us);
    }
    out
}
