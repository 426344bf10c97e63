//! The nemesis schedule: one seed and a duration in, a list of timed operations out, so
//! `make soak SEED=…` replays the schedule (not the exact interleaving, which the machine's load
//! decides).
//!
//! Lives here: [`Plan`], [`Step`], [`Op`] and [`Plan::generate`]. The schedule first lays out one
//! operation of every kind in a seeded order (so even a short run covers them all), then draws
//! at random; faults on one target never overlap each other, one operator fault and one
//! control-plane fault at a time, but faults of different scopes overlap freely. Pools are named
//! by index into the live pools at the moment the step runs. Must not live here: carrying the
//! steps out (the binary's `nemesis`).

use serde::{Deserialize, Serialize};

use crate::{history::FaultKind, rng::Rng};

/// One operation of the nemesis.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Op {
    /// A database fault on a target for `hold_ms` (`param`: the added latency in ms).
    Db {
        target: usize,
        kind: FaultKind,
        hold_ms: i64,
        param: u64,
    },
    /// A password rotation on a target: server then Secrets (`server_first`) or the reverse,
    /// `gap_ms` apart.
    Rotate {
        target: usize,
        server_first: bool,
        gap_ms: i64,
    },
    /// Stop the apiserver and start it again on its port.
    ApiserverRestart,
    /// SIGSTOP etcd for `hold_ms`.
    EtcdFreeze { hold_ms: i64 },
    /// SIGKILL the leader; start a replacement with its identity after `hold_ms`.
    LeaderKill { hold_ms: i64 },
    /// SIGSTOP the leader for `hold_ms` (past its lease), then SIGCONT.
    LeaderStop { hold_ms: i64 },
    /// Black-hole the leader's apiserver proxy for `hold_ms`.
    OperatorCut { hold_ms: i64 },
    /// A fresh force-reopen token on a pool.
    Token { pool: usize },
    /// breaker.mode set to `mode` for `hold_ms`, then back to Auto.
    Mode {
        pool: usize,
        mode: String,
        hold_ms: i64,
    },
    /// breaker.failureThreshold set.
    Threshold { pool: usize, value: i32 },
    /// breaker.openTimeout set.
    OpenTimeout { pool: usize, value: String },
    /// healthCheck.interval set.
    Interval { pool: usize, value: String },
    /// A new pool on a target, in namespace index `ns`.
    Create { target: usize, ns: usize },
    /// A pool deleted.
    Delete { pool: usize },
    /// spec.gate set on a pool of a gated namespace for `hold_ms`, then removed.
    Gate { pool: usize, hold_ms: i64 },
}

/// An operation at an offset from the nemesis's start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Step {
    /// Milliseconds after the nemesis started.
    pub at_ms: i64,
    /// What.
    pub op: Op,
}

/// The whole schedule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Plan {
    /// The seed it came from.
    pub seed: u64,
    /// Every step, by time.
    pub steps: Vec<Step>,
}

/// The kinds of operation, for the first pass that covers each once.
const KINDS: [&str; 20] = [
    "kill",
    "stop",
    "restart",
    "blackhole",
    "refuse",
    "latency",
    "maxconn",
    "rotate",
    "apiserver",
    "etcd",
    "leaderkill",
    "leaderstop",
    "cut",
    "token",
    "mode",
    "threshold",
    "opentimeout",
    "interval",
    "churn",
    "gate",
];

/// Weights of the random pass (same order as `KINDS`): database faults and user actions most.
const WEIGHTS: [u64; 20] = [5, 5, 3, 5, 5, 4, 3, 4, 2, 2, 3, 3, 2, 8, 3, 2, 2, 2, 5, 2];

struct Busy {
    targets: Vec<i64>,
    operator: i64,
    control: i64,
}

impl Plan {
    /// The schedule of `seed` for a nemesis of `duration_ms` over `targets` targets, with the
    /// operators' lease of `lease_ms`. Every fault ends before `duration_ms`.
    pub fn generate(seed: u64, duration_ms: i64, targets: usize, lease_ms: i64) -> Plan {
        let mut rng = Rng::new(seed);
        let mut busy = Busy {
            targets: vec![0; targets.max(1)],
            operator: 0,
            control: 0,
        };
        let mut steps = Vec::new();
        let mut order: Vec<usize> = (0..KINDS.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut at = 2_000;
        let mut first = order.into_iter();
        while at < duration_ms - 1_000 {
            let kind = first.next().unwrap_or_else(|| weighted(&mut rng));
            let room = duration_ms - 500 - at;
            if let Some(op) = make(&mut rng, kind, at, room, lease_ms, &mut busy) {
                steps.push(Step { at_ms: at, op });
            }
            at += rng.range(700, 3_000) as i64;
        }
        Plan { seed, steps }
    }

    /// How many steps of each kind, for the report.
    pub fn counts(&self) -> Vec<(String, usize)> {
        let mut out: std::collections::BTreeMap<String, usize> = Default::default();
        for s in &self.steps {
            *out.entry(s.op.name()).or_default() += 1;
        }
        out.into_iter().collect()
    }
}

impl Op {
    /// A short name of the operation's kind.
    pub fn name(&self) -> String {
        match self {
            Op::Db { kind, .. } => format!("{kind:?}"),
            Op::Rotate { .. } => "SecretRotation".into(),
            Op::ApiserverRestart => "ApiserverRestart".into(),
            Op::EtcdFreeze { .. } => "EtcdFreeze".into(),
            Op::LeaderKill { .. } => "LeaderKill".into(),
            Op::LeaderStop { .. } => "LeaderStop".into(),
            Op::OperatorCut { .. } => "OperatorCut".into(),
            Op::Token { .. } => "Token".into(),
            Op::Mode { .. } => "Mode".into(),
            Op::Threshold { .. } => "Threshold".into(),
            Op::OpenTimeout { .. } => "OpenTimeout".into(),
            Op::Interval { .. } => "Interval".into(),
            Op::Create { .. } => "Create".into(),
            Op::Delete { .. } => "Delete".into(),
            Op::Gate { .. } => "Gate".into(),
        }
    }
}

fn weighted(rng: &mut Rng) -> usize {
    let total: u64 = WEIGHTS.iter().sum();
    let mut x = rng.below(total);
    for (i, w) in WEIGHTS.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    0
}

fn hold(rng: &mut Rng, lo: i64, hi: i64, room: i64) -> Option<i64> {
    let h = rng.range(lo as u64, hi as u64) as i64;
    (h <= room).then_some(h)
}

fn free_target(rng: &mut Rng, busy: &Busy, at: i64) -> Option<usize> {
    let free: Vec<usize> = (0..busy.targets.len())
        .filter(|t| busy.targets[*t] <= at)
        .collect();
    (!free.is_empty()).then(|| *rng.pick(&free))
}

fn make(rng: &mut Rng, kind: usize, at: i64, room: i64, lease: i64, busy: &mut Busy) -> Option<Op> {
    let pool = rng.below(1_000) as usize;
    let db = |kind: FaultKind, rng: &mut Rng, busy: &mut Busy, lo: i64, hi: i64| {
        let target = free_target(rng, busy, at)?;
        let hold_ms = hold(rng, lo, hi, room)?;
        let param = rng.range(150, 1_500);
        busy.targets[target] = at + hold_ms + 1_000;
        Some(Op::Db {
            target,
            kind,
            hold_ms,
            param,
        })
    };
    match KINDS[kind] {
        "kill" => db(FaultKind::DbKill, rng, busy, 2_000, 12_000),
        "stop" => db(FaultKind::DbStop, rng, busy, 2_000, 12_000),
        "restart" => db(FaultKind::DbRestart, rng, busy, 0, 0),
        "blackhole" => db(FaultKind::BlackHole, rng, busy, 2_000, 10_000),
        "refuse" => db(FaultKind::Refuse, rng, busy, 2_000, 10_000),
        "latency" => db(FaultKind::Latency, rng, busy, 3_000, 10_000),
        "maxconn" => db(FaultKind::MaxConnections, rng, busy, 3_000, 10_000),
        "rotate" => {
            let target = free_target(rng, busy, at)?;
            let gap_ms = hold(rng, 500, 5_000, room)?;
            busy.targets[target] = at + gap_ms + 3_000;
            Some(Op::Rotate {
                target,
                server_first: rng.chance(0.5),
                gap_ms,
            })
        }
        "apiserver" | "etcd" if busy.control > at => None,
        "apiserver" => {
            busy.control = at + 20_000;
            (room > 20_000).then_some(Op::ApiserverRestart)
        }
        "etcd" => {
            let hold_ms = hold(rng, 1_000, 5_000, room)?;
            busy.control = at + hold_ms + 2_000;
            Some(Op::EtcdFreeze { hold_ms })
        }
        "leaderkill" | "leaderstop" | "cut" if busy.operator > at => None,
        "leaderkill" => {
            let hold_ms = hold(rng, 500, 3_000, room)?;
            busy.operator = at + hold_ms + lease + 2_000;
            Some(Op::LeaderKill { hold_ms })
        }
        "leaderstop" => {
            let hold_ms = hold(rng, lease + 1_000, lease + 5_000, room)?;
            busy.operator = at + hold_ms + 2_000;
            Some(Op::LeaderStop { hold_ms })
        }
        "cut" => {
            let hold_ms = hold(rng, lease + 1_000, lease + 6_000, room)?;
            busy.operator = at + hold_ms + lease + 2_000;
            Some(Op::OperatorCut { hold_ms })
        }
        "token" => Some(Op::Token { pool }),
        "mode" => {
            let mode = if rng.chance(0.7) {
                "ForcedOpen"
            } else {
                "Disabled"
            }
            .to_owned();
            let hold_ms = hold(rng, 2_000, 10_000, room)?;
            Some(Op::Mode {
                pool,
                mode,
                hold_ms,
            })
        }
        "threshold" => Some(Op::Threshold {
            pool,
            value: *rng.pick(&[2, 3, 4, 5]),
        }),
        "opentimeout" => Some(Op::OpenTimeout {
            pool,
            value: rng.pick(&["1s", "2s", "4s"]).to_string(),
        }),
        "interval" => Some(Op::Interval {
            pool,
            value: rng.pick(&["3s", "4s", "5s"]).to_string(),
        }),
        "churn" if rng.chance(0.5) => Some(Op::Delete { pool }),
        "churn" => Some(Op::Create {
            target: rng.below(busy.targets.len() as u64) as usize,
            ns: rng.below(3) as usize,
        }),
        "gate" => Some(Op::Gate {
            pool,
            hold_ms: hold(rng, 2_000, 15_000, room)?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_its_schedule_and_faults_on_a_target_never_overlap() {
        let a = Plan::generate(27, 120_000, 3, 4_000);
        assert_eq!(a, Plan::generate(27, 120_000, 3, 4_000));
        assert_ne!(a, Plan::generate(28, 120_000, 3, 4_000));
        let kinds: std::collections::BTreeSet<String> =
            a.steps.iter().map(|s| s.op.name()).collect();
        assert!(kinds.len() >= 15, "{kinds:?}");
        let mut last_end = [0i64; 3];
        for s in &a.steps {
            let (target, end) = match &s.op {
                Op::Db {
                    target, hold_ms, ..
                } => (*target, s.at_ms + hold_ms),
                Op::Rotate { target, gap_ms, .. } => (*target, s.at_ms + gap_ms),
                _ => continue,
            };
            assert!(
                s.at_ms >= last_end[target],
                "overlap on target {target}: {s:?}"
            );
            assert!(end <= 120_000);
            last_end[target] = end;
        }
    }
}
