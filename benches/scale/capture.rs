//! The bench's [`Observer`]: the operator's probes and acknowledged status writes, as typed
//! values from `controller::run_observed`, delivered to the run's [`Store`].
//!
//! Lives here: [`BenchObserver`] and its two sinks: in a child process it appends one compact
//! line per observation to a buffer that a thread flushes to stdout every 20 ms (`P` and `W`
//! lines, [`parse_line`] reads them back in the parent); in-process it pushes into the store
//! directly. Must not live here: parsing log text (the operator's log is for people, nothing
//! reads it), starting the operator (`operator`), any statistics.
//!
//! The observer is called inline on the controller's reconcile path: it formats or pushes one
//! record under a mutex and returns.

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dbpool_operator::{
    api::{DbPool, Phase, ProbeOutcome},
    controller::{Observer, ProbeObservation},
};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use crate::store::{ProbeEvent, Store, pool_index};

/// Where a [`BenchObserver`] delivers.
enum Sink {
    /// Lines for the parent (child process mode).
    Lines(Arc<Mutex<Vec<u8>>>),
    /// The store itself (in-process mode), tagged with the operator's generation; `live` turns
    /// false when that operator is killed, so a task still winding down adds nothing.
    Store {
        store: Arc<Store>,
        op: u32,
        live: Arc<AtomicBool>,
    },
}

/// Feeds the bench's store from the controller's typed observations.
pub struct BenchObserver {
    sink: Sink,
}

impl BenchObserver {
    /// An observer that writes `P`/`W` lines into `buffer` (see [`spawn_stdout_flusher`]).
    pub fn lines(buffer: Arc<Mutex<Vec<u8>>>) -> Self {
        Self {
            sink: Sink::Lines(buffer),
        }
    }

    /// An observer that pushes into `store` as operator `op`, while `live` is true.
    pub fn store(store: Arc<Store>, op: u32, live: Arc<AtomicBool>) -> Self {
        Self {
            sink: Sink::Store { store, op, live },
        }
    }
}

/// Latency as the bench has always measured it: whole milliseconds (truncated).
fn latency_ms(latency: Duration) -> u64 {
    u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)
}

impl Observer for BenchObserver {
    fn probe_finished(&self, probe: &ProbeObservation<'_>) {
        let finish_us = probe.finished.as_microsecond();
        let latency = latency_ms(probe.latency);
        let ok = probe.outcome == ProbeOutcome::Success;
        let fresh = probe.fresh_connection;
        let shared = probe.shared;
        match &self.sink {
            Sink::Lines(buffer) => {
                let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
                // Writing into a Vec cannot fail.
                let _ = writeln!(
                    buf,
                    "P {} {finish_us} {latency} {} {} {}",
                    probe.pool.name,
                    u8::from(ok),
                    u8::from(fresh),
                    u8::from(shared)
                );
            }
            Sink::Store { store, op, live } => {
                if live.load(Ordering::Relaxed)
                    && let Some(pool) = pool_index(&probe.pool.name)
                {
                    store.push_probe(ProbeEvent::new(
                        *op, pool, finish_us, latency, ok, fresh, shared,
                    ));
                }
            }
        }
    }

    fn status_written(&self, pool: &ObjectRef<DbPool>, at: Timestamp, phase: Option<Phase>) {
        let at_us = at.as_microsecond();
        match &self.sink {
            Sink::Lines(buffer) => {
                let mut buf = buffer.lock().unwrap_or_else(|e| e.into_inner());
                let phase = phase.map_or_else(|| "-".to_owned(), |p| format!("{p:?}"));
                let _ = writeln!(buf, "W {} {at_us} {phase}", pool.name);
            }
            Sink::Store { store, live, .. } => {
                if live.load(Ordering::Relaxed)
                    && let Some(index) = pool_index(&pool.name)
                {
                    store.push_ack(index, at_us, phase);
                }
            }
        }
    }
}

/// Copies `buffer` to stdout every 20 ms; exits the process when stdout is gone (the bench
/// ended, and with it the reason to run).
pub fn spawn_stdout_flusher(buffer: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let chunk = std::mem::take(&mut *buffer.lock().unwrap_or_else(|e| e.into_inner()));
            if !chunk.is_empty() && (stdout.write_all(&chunk).is_err() || stdout.flush().is_err()) {
                std::process::exit(0);
            }
        }
    });
}

/// One line of the child's stdout, read back.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// `P <pool> <finish µs> <latency ms> <ok 0/1> <fresh 0/1> <shared 0/1>`
    Probe(ProbeEvent),
    /// `W <pool> <acknowledged µs> <phase or ->`
    Write(u32, i64, Option<Phase>),
}

/// Parses a `P` or `W` line of operator generation `op`; `None` for anything else.
pub fn parse_line(line: &str, op: u32) -> Option<Line> {
    let mut parts = line.split(' ');
    let kind = parts.next()?;
    let pool = pool_index(parts.next()?)?;
    let at_us = parts.next()?.parse().ok()?;
    match kind {
        "P" => {
            let latency_ms = parts.next()?.parse().ok()?;
            let ok = parts.next()? == "1";
            let fresh = parts.next()? == "1";
            let shared = parts.next() == Some("1");
            let event = ProbeEvent::new(op, pool, at_us, latency_ms, ok, fresh, shared);
            Some(Line::Probe(event))
        }
        "W" => {
            let phase = parts.next().and_then(|p| {
                serde_json::from_value::<Phase>(serde_json::Value::String(p.to_owned())).ok()
            });
            Some(Line::Write(pool, at_us, phase))
        }
        _ => None,
    }
}
