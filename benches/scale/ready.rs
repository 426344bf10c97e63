//! What the recovery phase measures between: PostgreSQL's own "ready to accept connections" line
//! and the instant a watch on the DbPool sees `Ready=True`.
//!
//! Lives here: [`ReadyWatch`] (a watch on the pools with one label, every event stamped on
//! receipt), [`ready_line_after`] (the `%m` stamp of the first ready line after an offset of a
//! server log), [`log_len`], [`LOG_CONF`] (the postgresql.conf lines that make the stamp parseable)
//! and [`metric_sum`] (a counter family from an operator's /metrics text). Must not live here:
//! starting or stopping servers and the runs themselves (`phases::recovery`), statistics
//! (`report`).

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use dbpool_operator::api::{CONDITION_READY, DbPool, Phase};
use futures::StreamExt;
use k8s_openapi::jiff::{civil::DateTime, tz::TimeZone};
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::task::JoinHandle;

use crate::procfs::now_us;

/// The line PostgreSQL logs when it accepts connections (after a start and after crash
/// recovery).
pub const READY_LINE: &str = "database system is ready to accept connections";

/// postgresql.conf lines of the phase's servers: every log line starts with the `%m` timestamp
/// (milliseconds) in UTC, which [`ready_line_after`] parses.
pub const LOG_CONF: [&str; 2] = ["log_line_prefix = '%m [%p] '", "log_timezone = 'UTC'"];

/// One watch event: the pool, its receipt instant (µs), whether Ready was True, its phase.
#[derive(Clone, Debug)]
pub struct ReadyEvent {
    /// The pool's name.
    pub pool: String,
    /// Receipt instant (µs since the epoch).
    pub at_us: i64,
    /// Whether the Ready condition was True.
    pub ready: bool,
    /// `status.phase`.
    pub phase: Option<Phase>,
}

/// A watch on the DbPools with a label, recording every event it receives.
pub struct ReadyWatch {
    events: Arc<Mutex<Vec<ReadyEvent>>>,
    task: JoinHandle<()>,
}

impl ReadyWatch {
    /// Starts watching the pools of `api` labelled `selector` (e.g. `bench=recovery`).
    pub fn start(api: Api<DbPool>, selector: &str) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let config = watcher::Config::default().labels(selector);
        let task = tokio::spawn(async move {
            let stream = watcher(api, config).default_backoff().applied_objects();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let at_us = now_us();
                let Ok(pool) = item else { continue };
                let status = pool.status.as_ref();
                let ready = status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == CONDITION_READY && c.status == "True")
                });
                let event = ReadyEvent {
                    pool: pool.name_any(),
                    at_us,
                    ready,
                    phase: status.and_then(|s| s.phase),
                };
                if let Ok(mut events) = sink.lock() {
                    events.push(event);
                }
            }
        });
        Self { events, task }
    }

    /// The first event of `pool` received at or after `since_us` with Ready as `ready`: its
    /// receipt instant.
    pub fn first(&self, pool: &str, since_us: i64, ready: bool) -> Option<i64> {
        let events = self.events.lock().ok()?;
        events
            .iter()
            .find(|e| e.pool == pool && e.at_us >= since_us && e.ready == ready)
            .map(|e| e.at_us)
    }

    /// The latest event of `pool`.
    pub fn latest(&self, pool: &str) -> Option<ReadyEvent> {
        let events = self.events.lock().ok()?;
        events.iter().rev().find(|e| e.pool == pool).cloned()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The length of a server log now: where the next run's lines start.
pub fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The `%m` stamp (µs since the epoch) of the first ready line of the log at `path` after byte
/// `offset`, or `None` while there is none.
pub fn ready_line_after(path: &Path, offset: u64) -> Option<i64> {
    let text = std::fs::read(path).ok()?;
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    let tail = String::from_utf8_lossy(&text[start..]);
    let line = tail.lines().find(|l| l.contains(READY_LINE))?;
    parse_stamp(line)
}

/// A `%m` stamp at the start of a log line ("2026-12-02 13:51:09.123 UTC ..."), in µs.
pub fn parse_stamp(line: &str) -> Option<i64> {
    let stamp = line.get(..23)?;
    if line.get(23..27) != Some(" UTC") {
        return None;
    }
    let civil = DateTime::strptime("%Y-%m-%d %H:%M:%S%.f", stamp).ok()?;
    Some(
        civil
            .to_zoned(TimeZone::UTC)
            .ok()?
            .timestamp()
            .as_microsecond(),
    )
}

/// Lines of the log at `path` after `offset` that contain `needle`.
pub fn log_lines_after(path: &Path, offset: u64, needle: &str) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    String::from_utf8_lossy(&text[start..])
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The sum of the samples of metric lines starting with `prefix` in a /metrics text.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
