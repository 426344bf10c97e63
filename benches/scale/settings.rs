//! What a bench run is asked to do, and the recovery policy every pool gets.
//!
//! Lives here: [`Settings`] (read once from `BENCH_*` variables and the command line), [`Mode`],
//! the pools' recovery policy as a library [`Policy`] (so the theoretical schedule is computed by
//! the engine's own [`backoff_delay`]) and the few names shared by the manifest and the Secret.
//! Must not live here: anything that measures, starts processes or talks to the apiserver.

use std::{path::PathBuf, time::Duration};

use dbpool_operator::recovery::{BreakerMode, Policy, backoff_delay};

/// Set in the environment of the child process that runs the operator.
pub const CHILD_ENV: &str = "DBPOOL_BENCH_OPERATOR_CHILD";
/// The Secret every pool reads its password from.
pub const SECRET: &str = "db-credentials";
/// The key of the password in [`SECRET`].
pub const KEY: &str = "password";
/// openTimeout of the force-reopen sample: only the annotation closes their breaker.
pub const LONG_OPEN_TIMEOUT: &str = "10m";
/// Writes to the apiserver in flight at once when creating or patching pools.
pub const API_CONCURRENCY: usize = 16;

/// The recovery policy of every pool (apart from the sample's openTimeout and the interval, which
/// the phases change): backoff 500ms × 2 up to 2s with **jitter 0**, so the theoretical schedule
/// is exact; failureThreshold 3, openTimeout 4s.
pub fn pool_policy(interval: Duration) -> Policy {
    Policy {
        interval,
        timeout: Duration::from_secs(1),
        initial_delay: Duration::from_millis(500),
        multiplier: 2.0,
        max_delay: Duration::from_secs(2),
        max_attempts: 10,
        cooldown: Duration::from_secs(30),
        jitter: 0.0,
        failure_threshold: 3,
        open_timeout: Duration::from_secs(4),
        success_threshold: 1,
        mode: BreakerMode::Auto,
        early_trial: true,
    }
}

/// Delay `i` (from 0) of the pools' backoff, from the engine's own rule (jitter 0, so the seed
/// does not matter).
pub fn pool_backoff(i: usize) -> Duration {
    let index = u32::try_from(i).unwrap_or(u32::MAX);
    backoff_delay(&pool_policy(Duration::from_secs(30)), 0, index)
}

/// Where the operator under test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A child process: this bench binary calling `controller::run_observed`.
    Child,
    /// A dedicated tokio runtime inside the bench process.
    InProcess,
}

/// The run's settings (docs/benchmarks.md lists the variables).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pool counts, one run each (`BENCH_N` or the command line).
    pub sizes: Vec<usize>,
    /// PostgreSQL servers; pool *i* probes server *i mod targets* (`BENCH_TARGETS`).
    pub targets: usize,
    /// Where the operator runs (`BENCH_OPERATOR`).
    pub mode: Mode,
    /// Interval of the steady-state phase (`BENCH_STEADY_INTERVAL`).
    pub steady_interval: Duration,
    /// Length of the steady-state window, when set (`BENCH_STEADY_SECS`).
    pub steady_window: Option<Duration>,
    /// The short interval of the later phases (`BENCH_FAST_INTERVAL`).
    pub fast_interval: Duration,
    /// Length of the later phases' windows (`BENCH_WINDOW_SECS`).
    pub window: Duration,
    /// Size of the force-reopen sample (`BENCH_SAMPLE`).
    pub sample: usize,
    /// `status_refresh` of the operator the first restart starts (`BENCH_SHORT_REFRESH_SECS`).
    pub short_refresh: Duration,
    /// Whether to run the one-connection-per-pool comparison (`BENCH_DISTINCT`).
    pub distinct: bool,
    /// Pools that fail one at a time in the isolated-faults phase (`BENCH_VICTIMS`).
    pub victims: usize,
    /// Faults of the isolated-faults phase, in all (`BENCH_ISOLATED_FAULTS`).
    pub isolated_faults: usize,
    /// The phases to run (`BENCH_PHASES`).
    pub phases: Vec<String>,
    /// Where the report goes (`BENCH_OUT`).
    pub out: Option<PathBuf>,
    /// The recovery phase's runs (`BENCH_RECOVERY_*`).
    pub recovery: RecoveryRuns,
}

/// How many runs of each kind the recovery phase makes, and their sizes.
#[derive(Clone, Debug)]
pub struct RecoveryRuns {
    /// Runs of a 3 s outage of one pool's server (`BENCH_RECOVERY_SHORT`, 20).
    pub short_runs: usize,
    /// Runs of a 30 s outage, breaker Open (`BENCH_RECOVERY_LONG`, 5).
    pub long_runs: usize,
    /// Crash-recovery runs (`BENCH_RECOVERY_CRASH`, 2).
    pub crash_runs: usize,
    /// WAL written before each crash, MB (`BENCH_RECOVERY_WAL_MB`, 512).
    pub wal_mb: u64,
    /// Pools of the fleet restarting together (`BENCH_RECOVERY_FLEET`, 100; 0 skips it).
    pub fleet_pools: usize,
    /// Servers of the fleet (`BENCH_RECOVERY_FLEET_TARGETS`, 10).
    pub fleet_targets: usize,
    /// Restarts of the fleet (`BENCH_RECOVERY_FLEET_RUNS`, 3).
    pub fleet_runs: usize,
}

impl RecoveryRuns {
    fn from_env() -> Self {
        let n = |name: &str, default: u64| env_u64(name).unwrap_or(default) as usize;
        Self {
            short_runs: n("BENCH_RECOVERY_SHORT", 20),
            long_runs: n("BENCH_RECOVERY_LONG", 5),
            crash_runs: n("BENCH_RECOVERY_CRASH", 2),
            wal_mb: env_u64("BENCH_RECOVERY_WAL_MB").unwrap_or(512),
            fleet_pools: n("BENCH_RECOVERY_FLEET", 100),
            fleet_targets: n("BENCH_RECOVERY_FLEET_TARGETS", 10).max(1),
            fleet_runs: n("BENCH_RECOVERY_FLEET_RUNS", 3),
        }
    }
}

/// A whole number from the environment; panics on anything else (a typo must not pass silently).
pub fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = value.trim().parse().ok();
    assert!(parsed.is_some(), "{name}={value:?} is not a whole number");
    parsed
}

impl Settings {
    /// Reads the settings from the command line (pool counts) and the `BENCH_*` variables.
    pub fn from_env() -> Self {
        let mut sizes: Vec<usize> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .filter_map(|a| a.parse().ok())
            .collect();
        if sizes.is_empty() {
            sizes = std::env::var("BENCH_N")
                .unwrap_or_else(|_| "100 1000".to_owned())
                .split([' ', ','])
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().expect("BENCH_N: numbers such as \"100 1000\""))
                .collect();
        }
        let mode = match std::env::var("BENCH_OPERATOR").as_deref() {
            Ok("inprocess") => Mode::InProcess,
            Ok("child") | Err(_) => Mode::Child,
            Ok(other) => panic!("BENCH_OPERATOR={other:?}: use child or inprocess"),
        };
        let secs = |name: &str, default: u64| Duration::from_secs(env_u64(name).unwrap_or(default));
        Self {
            sizes,
            targets: env_u64("BENCH_TARGETS").unwrap_or(4).max(1) as usize,
            mode,
            steady_interval: secs("BENCH_STEADY_INTERVAL", 30),
            steady_window: env_u64("BENCH_STEADY_SECS").map(Duration::from_secs),
            fast_interval: secs("BENCH_FAST_INTERVAL", 5),
            window: secs("BENCH_WINDOW_SECS", 20),
            sample: env_u64("BENCH_SAMPLE").unwrap_or(50) as usize,
            short_refresh: secs("BENCH_SHORT_REFRESH_SECS", 10),
            distinct: env_u64("BENCH_DISTINCT").unwrap_or(1) != 0,
            victims: env_u64("BENCH_VICTIMS").unwrap_or(10).max(1) as usize,
            isolated_faults: env_u64("BENCH_ISOLATED_FAULTS").unwrap_or(100) as usize,
            phases: std::env::var("BENCH_PHASES")
                .unwrap_or_else(|_| {
                    "steady,fast,isolated,fault,floor,restart,coalescing".to_owned()
                })
                .split(',')
                .map(|p| p.trim().to_owned())
                .collect(),
            out: std::env::var_os("BENCH_OUT").map(PathBuf::from),
            recovery: RecoveryRuns::from_env(),
        }
    }

    /// Whether a phase other than `recovery` (which brings servers and pools of its own) runs:
    /// only then does a run start its `targets` servers and create its N pools.
    pub fn needs_pools(&self) -> bool {
        self.phases.iter().any(|p| p != "recovery")
    }

    /// The steady-state window: five intervals for 1,000 pools and more, three below.
    pub fn steady_window(&self, n: usize) -> Duration {
        self.steady_window
            .unwrap_or(self.steady_interval * if n >= 1000 { 5 } else { 3 })
    }
}
