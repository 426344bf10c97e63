//! The load: tasks looping call after call, and what each task records about its calls.
//!
//! Lives here: [`Marks`] (the scenario's instants, shared with the tasks as atomics), [`Load`]
//! (the tasks, pausing and stopping them), [`TaskStats`] (per task, aggregated online: counters,
//! latency histograms and a timeline of successes and failures per [`BUCKET_NS`], never one entry
//! per call, so memory stays bounded however fast a pool fails) and [`merge`]. Must not live here: the pools (`pools`) or the scenario's timeline
//! (`scenario`).

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::pools::{BenchPool, Op};

/// Most a recorded latency can be (longer ones are saturated): above every pool's waits.
const MAX_LATENCY_US: u64 = 300_000_000;

/// A new latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Bounds are constants within hdrhistogram's limits: cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap_or_else(|_| unreachable!())
}

const UNSET: u64 = u64::MAX;

/// Width of a timeline bucket (calls are counted by the bucket they ended in).
pub const BUCKET_NS: u64 = 10_000_000;

/// Longest timeline kept per run (calls ending later are not in the timeline, only in the stats).
pub const TIMELINE_NS: u64 = 150_000_000_000;

const BUCKETS: usize = (TIMELINE_NS / BUCKET_NS) as usize;

/// Instants of the scenario, in nanoseconds since `origin` (unset: `u64::MAX`).
pub struct Marks {
    origin: Instant,
    steady_start: AtomicU64,
    steady_end: AtomicU64,
    stop: AtomicU64,
    ready: AtomicU64,
}

/// Which instant of [`Marks`].
#[derive(Clone, Copy)]
pub enum Mark {
    /// The steady window begins.
    SteadyStart,
    /// The steady window ends.
    SteadyEnd,
    /// `pg_ctl stop` is invoked.
    Stop,
    /// `pg_ctl start` returned: the server is ready.
    Ready,
}

impl Marks {
    /// Marks with every instant unset, measured from now.
    pub fn new() -> Self {
        Marks {
            origin: Instant::now(),
            steady_start: AtomicU64::new(UNSET),
            steady_end: AtomicU64::new(UNSET),
            stop: AtomicU64::new(UNSET),
            ready: AtomicU64::new(UNSET),
        }
    }

    fn cell(&self, m: Mark) -> &AtomicU64 {
        match m {
            Mark::SteadyStart => &self.steady_start,
            Mark::SteadyEnd => &self.steady_end,
            Mark::Stop => &self.stop,
            Mark::Ready => &self.ready,
        }
    }

    /// Nanoseconds since the origin, now.
    pub fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(UNSET - 1)
    }

    /// Sets `m` to now and returns it.
    pub fn set(&self, m: Mark) -> u64 {
        let t = self.now();
        self.cell(m).store(t, Ordering::SeqCst);
        t
    }

    /// `m`, if set.
    pub fn get(&self, m: Mark) -> Option<u64> {
        let t = self.cell(m).load(Ordering::SeqCst);
        (t != UNSET).then_some(t)
    }
}

/// What one task saw. Times are nanoseconds since the marks' origin.
pub struct TaskStats {
    /// Successful calls that ended inside the steady window.
    pub steady_ok: u64,
    /// End of the first failed call that ended after the stop.
    pub first_fail_after_stop: Option<u64>,
    /// Failed calls that started after the stop and before ready.
    pub down_failures: u64,
    /// Their durations (µs).
    pub down_fail_hist: Histogram<u64>,
    /// The subset answered by dbpool-client's breaker (µs).
    pub open_fail_hist: Histogram<u64>,
    /// The rest: failures not answered by a breaker, i.e. before it opened (µs).
    pub closed_fail_hist: Histogram<u64>,
    /// Successes and failures per [`BUCKET_NS`] since the origin (by the call's end).
    pub timeline: Vec<(u32, u32)>,
    /// Longest call (ok or not) that started after the stop and before ready (µs).
    pub down_max_call_us: u64,
    /// End of the first successful call that ended after ready.
    pub first_ok_after_ready: Option<u64>,
    /// Errors returned after ready.
    pub errors_after_ready: u64,
    /// Calls made, all phases.
    pub calls: u64,
}

impl TaskStats {
    fn new() -> Self {
        TaskStats {
            steady_ok: 0,
            first_fail_after_stop: None,
            down_failures: 0,
            down_fail_hist: histogram(),
            open_fail_hist: histogram(),
            closed_fail_hist: histogram(),
            timeline: vec![(0, 0); BUCKETS],
            down_max_call_us: 0,
            first_ok_after_ready: None,
            errors_after_ready: 0,
            calls: 0,
        }
    }

    fn record(&mut self, marks: &Marks, start: u64, end: u64, result: &Result<(), bool>) {
        self.calls += 1;
        if let Some(b) = usize::try_from(end / BUCKET_NS)
            .ok()
            .and_then(|i| self.timeline.get_mut(i))
        {
            match result {
                Ok(()) => b.0 = b.0.saturating_add(1),
                Err(_) => b.1 = b.1.saturating_add(1),
            }
        }
        let us = (end.saturating_sub(start) / 1_000).max(1);
        let ready = marks.get(Mark::Ready);
        // The window's end is set when it closes: a call recorded before then ended inside it.
        if let Some(a) = marks.get(Mark::SteadyStart)
            && result.is_ok()
            && end >= a
            && marks.get(Mark::SteadyEnd).is_none_or(|b| end < b)
        {
            self.steady_ok += 1;
        }
        if let Some(stop) = marks.get(Mark::Stop) {
            let down = start >= stop && ready.is_none_or(|r| start < r);
            if down {
                self.down_max_call_us = self.down_max_call_us.max(us);
            }
            if let Err(breaker_open) = result {
                if end >= stop && self.first_fail_after_stop.is_none() {
                    self.first_fail_after_stop = Some(end);
                }
                if down {
                    self.down_failures += 1;
                    self.down_fail_hist.saturating_record(us);
                    if *breaker_open {
                        self.open_fail_hist.saturating_record(us);
                    } else {
                        self.closed_fail_hist.saturating_record(us);
                    }
                }
            }
        }
        if let Some(r) = ready
            && end >= r
        {
            match result {
                Ok(()) => {
                    if self.first_ok_after_ready.is_none() {
                        self.first_ok_after_ready = Some(end);
                    }
                }
                Err(_) => self.errors_after_ready += 1,
            }
        }
    }
}

/// All tasks' stats merged.
pub struct Merged {
    /// Sum of steady successes.
    pub steady_ok: u64,
    /// Earliest first failure after the stop.
    pub first_fail_after_stop: Option<u64>,
    /// Sum of failures while down.
    pub down_failures: u64,
    /// Failure latencies while down (µs).
    pub down_fail_hist: Histogram<u64>,
    /// Breaker-open failure latencies (µs).
    pub open_fail_hist: Histogram<u64>,
    /// Failure latencies not answered by a breaker (µs).
    pub closed_fail_hist: Histogram<u64>,
    /// Successes and failures per [`BUCKET_NS`], all tasks.
    pub timeline: Vec<(u32, u32)>,
    /// Longest call while down (µs).
    pub down_max_call_us: u64,
    /// Each task's first success after ready (None: it never succeeded).
    pub first_ok_after_ready: Vec<Option<u64>>,
    /// Sum of errors after ready.
    pub errors_after_ready: u64,
    /// Calls made.
    pub calls: u64,
}

/// Merges every task's stats.
pub fn merge(stats: &[Arc<Mutex<TaskStats>>]) -> Merged {
    let mut m = Merged {
        steady_ok: 0,
        first_fail_after_stop: None,
        down_failures: 0,
        down_fail_hist: histogram(),
        open_fail_hist: histogram(),
        closed_fail_hist: histogram(),
        timeline: vec![(0, 0); BUCKETS],
        down_max_call_us: 0,
        first_ok_after_ready: Vec::new(),
        errors_after_ready: 0,
        calls: 0,
    };
    for s in stats {
        let s = s.lock().unwrap_or_else(PoisonError::into_inner);
        m.steady_ok += s.steady_ok;
        m.first_fail_after_stop = match (m.first_fail_after_stop, s.first_fail_after_stop) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        m.down_failures += s.down_failures;
        // Same bounds on both sides: adding cannot fail.
        let _ = m.down_fail_hist.add(&s.down_fail_hist);
        let _ = m.open_fail_hist.add(&s.open_fail_hist);
        let _ = m.closed_fail_hist.add(&s.closed_fail_hist);
        for (a, b) in m.timeline.iter_mut().zip(&s.timeline) {
            a.0 = a.0.saturating_add(b.0);
            a.1 = a.1.saturating_add(b.1);
        }
        m.down_max_call_us = m.down_max_call_us.max(s.down_max_call_us);
        m.first_ok_after_ready.push(s.first_ok_after_ready);
        m.errors_after_ready += s.errors_after_ready;
        m.calls += s.calls;
    }
    m
}

/// The running tasks.
pub struct Load {
    /// Per task stats, updated after every call.
    pub stats: Vec<Arc<Mutex<TaskStats>>>,
    /// Tasks that succeeded at least once after ready.
    pub recovered: Arc<AtomicUsize>,
    /// Tasks parked by a pause.
    pub parked: Arc<AtomicUsize>,
    paused: watch::Sender<bool>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `tasks` tasks looping [`BenchPool::call`] with `op` on `pool`.
    pub fn start(pool: Arc<BenchPool>, marks: Arc<Marks>, tasks: usize, op: Op) -> Load {
        let (paused, _) = watch::channel(false);
        let stop = Arc::new(AtomicBool::new(false));
        let recovered = Arc::new(AtomicUsize::new(0));
        let parked = Arc::new(AtomicUsize::new(0));
        let mut stats = Vec::new();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let st = Arc::new(Mutex::new(TaskStats::new()));
            stats.push(Arc::clone(&st));
            let (pool, marks, stop) = (Arc::clone(&pool), Arc::clone(&marks), Arc::clone(&stop));
            let (recovered, parked) = (Arc::clone(&recovered), Arc::clone(&parked));
            let mut pause = paused.subscribe();
            handles.push(tokio::spawn(async move {
                let mut counted = false;
                while !stop.load(Ordering::Relaxed) {
                    if *pause.borrow() {
                        parked.fetch_add(1, Ordering::SeqCst);
                        let _ = pause.wait_for(|p| !*p).await;
                        parked.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    let start = marks.now();
                    let result = pool.call(task, op).await.map_err(|e| e.breaker_open);
                    let end = marks.now();
                    let mut s = st.lock().unwrap_or_else(PoisonError::into_inner);
                    s.record(&marks, start, end, &result);
                    if !counted && s.first_ok_after_ready.is_some() {
                        counted = true;
                        recovered.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        Load {
            stats,
            recovered,
            parked,
            paused,
            stop,
            handles,
        }
    }

    /// Parks the tasks after their current call.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Lets parked tasks go on.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Stops the tasks: each ends after its current call; a task still in a call after `grace`
    /// is aborted (its stats so far are kept).
    pub async fn stop(self, grace: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.paused.send_replace(false);
        let deadline = Instant::now() + grace;
        for h in self.handles {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                abort.abort();
            }
        }
    }
}
