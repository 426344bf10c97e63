//! The history as it is being recorded: faults begun and ended, user actions, samples.
//!
//! Lives here: [`Recorder`] (a lock around a [`History`]) and [`now_ms`], the one clock of the
//! soak (the host's wall clock, which the audit log and PostgreSQL's log use too). Must not live
//! here: what the records mean (the library's checkers).

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use dbpool_soak::history::{Action, ActionKind, Fault, FaultKind, History, Ms, Sample, Scope};

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> Ms {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Ms)
}

/// The history being recorded, shared by the nemesis, the sampler and the driver.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<History>>);

impl Recorder {
    /// The history, locked.
    pub fn lock(&self) -> MutexGuard<'_, History> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fault begins now; returns its index for [`Recorder::end`].
    pub fn begin(&self, kind: FaultKind, scope: Scope, detail: String) -> usize {
        let mut h = self.lock();
        eprintln!("[soak] fault {kind:?} on {scope:?} begins ({detail})");
        h.faults.push(Fault {
            kind,
            scope,
            start: now_ms(),
            end: None,
            detail,
        });
        h.faults.len() - 1
    }

    /// Fault `index` ends now.
    pub fn end(&self, index: usize) {
        let mut h = self.lock();
        let t = now_ms();
        if let Some(f) = h.faults.get_mut(index) {
            f.end = Some(t);
            eprintln!("[soak] fault {:?} on {:?} ends", f.kind, f.scope);
        }
        h.last_fault_end = h.last_fault_end.max(t);
    }

    /// A user action on `pool` that took effect at `time` (see `world::settle`).
    pub fn action_at(&self, pool: &str, kind: ActionKind, time: Ms) {
        self.lock().actions.push(Action {
            pool: pool.to_owned(),
            time,
            kind,
        });
    }

    /// A resource sample.
    pub fn sample(&self, what: &str, subject: &str, value: f64) {
        self.lock().samples.push(Sample {
            time: now_ms(),
            what: what.to_owned(),
            subject: subject.to_owned(),
            value,
        });
    }
}
