//! What a run's timeline plot needs beyond the calls: samples of dbpool-client's status and the
//! kernel's connect counter, taken every [`SAMPLE_EVERY`] while the run goes on.
//!
//! Lives here: [`Sample`] and [`Sampler`] (a task on the scenario's runtime, so a load that
//! starves its own runtime does not stop it; it keeps a sample only when something changed, at
//! most [`MAX_SAMPLES`]). Must not live here: the calls' timeline (`load`), drawing (`plot`).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use dbpool_client::BreakerState;
use tokio::task::JoinHandle;

use crate::{load::Marks, netcount::TcpCounters, pools::BenchPool};

/// How often the sampler looks.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// Most samples kept per run (changes only; a 150 s run at 5 ms is 30,000 looks).
pub const MAX_SAMPLES: usize = 40_000;

/// One look, kept because something changed since the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Nanoseconds since the run's origin.
    pub t: u64,
    /// dbpool-client's local breaker (None: not dbpool-client).
    pub breaker: Option<BreakerState>,
    /// dbpool-client's connects started so far (`status().connects_started`: connects with
    /// credentials, the callers' and the supervisor's).
    pub connects: Option<u64>,
    /// dbpool-client's readiness pings started so far (`status().pings_started`).
    pub pings: Option<u64>,
    /// `Tcp: ActiveOpens` of the namespace: every connect(), credentialed or not.
    pub active_opens: u64,
}

/// The sampling task.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `pool` (on the current runtime).
    pub fn start(pool: Arc<BenchPool>, marks: Arc<Marks>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, st) = (Arc::clone(&samples), Arc::clone(&stop));
        let handle = tokio::spawn(async move {
            let mut last: Option<Sample> = None;
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                let status = pool.status();
                let sample = Sample {
                    t: marks.now(),
                    breaker: status.as_ref().map(|s| s.breaker),
                    connects: status.as_ref().map(|s| s.connects_started),
                    pings: status.as_ref().map(|s| s.pings_started),
                    active_opens: TcpCounters::read().active_opens,
                };
                let changed = last.is_none_or(|l| {
                    (l.breaker, l.connects, l.pings, l.active_opens)
                        != (
                            sample.breaker,
                            sample.connects,
                            sample.pings,
                            sample.active_opens,
                        )
                });
                if changed {
                    let mut v = s.lock().unwrap_or_else(PoisonError::into_inner);
                    if v.len() < MAX_SAMPLES {
                        v.push(sample);
                    }
                    last = Some(sample);
                }
            }
        });
        Sampler {
            stop,
            samples,
            handle,
        }
    }

    /// Stops sampling and returns the samples.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.handle).await;
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
