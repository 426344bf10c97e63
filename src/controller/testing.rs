//! Fixtures for the controller's unit tests (compiled only for tests).
//!
//! Lives here: a DbPool, a probe summary and fleet-guard settings that several modules' tests
//! share. Must not live here: anything a test asserts.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp};

use super::FleetGuardSettings;
use crate::api::{DbPool, DbPoolSpec, ProbeOutcome, ProbeStage, ProbeSummary};

/// A DbPool `ns/name` with uid `uid-{name}`, generation 1 and no status.
pub(crate) fn pool(name: &str) -> DbPool {
    let spec: DbPoolSpec = serde_json::from_value(serde_json::json!({
        "database": {"host": "h", "dbname": "d", "user": "u"}
    }))
    .expect("spec");
    let mut pool = DbPool::new(name, spec);
    pool.metadata.namespace = Some("ns".into());
    pool.metadata.uid = Some(format!("uid-{name}"));
    pool.metadata.generation = Some(1);
    pool
}

/// A probe summary with this outcome at `at` (latency 1 ms, the saturation stage for a
/// success).
pub(crate) fn summary(outcome: ProbeOutcome, at: Timestamp) -> ProbeSummary {
    ProbeSummary {
        time: MicroTime(at),
        outcome,
        stage: (outcome == ProbeOutcome::Success).then_some(ProbeStage::Saturation),
        latency_ms: 1,
        message: None,
        sql_state: None,
        server_version: None,
        in_recovery: None,
        connections: None,
        max_connections: None,
    }
}

/// Fleet-guard settings that trip with three targets: enabled, share 0.5, window 30 s, max
/// hold 60 s.
pub(crate) fn fleet_settings() -> FleetGuardSettings {
    FleetGuardSettings {
        enabled: true,
        share: 0.5,
        min_targets: 3,
        window: std::time::Duration::from_secs(30),
        max_hold: std::time::Duration::from_secs(60),
    }
}

/// The test binary's allocator: the system's, counting what each thread holds, so a test can
/// measure the heap a structure keeps without the other tests' threads in its figure.
pub(crate) mod heap {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    /// The system allocator, counting per thread.
    struct Counting;

    thread_local! {
        static BYTES: Cell<isize> = const { Cell::new(0) };
        static BLOCKS: Cell<isize> = const { Cell::new(0) };
    }

    /// What glibc's malloc takes for a request of `size` bytes: an 8-byte header, rounded up to
    /// 16, at least 32 (what a live allocation costs in memory, not only what it asked).
    fn chunk(size: usize) -> isize {
        isize::try_from((size + 8).div_ceil(16) * 16)
            .unwrap_or(isize::MAX)
            .max(32)
    }

    fn note(bytes: isize, blocks: isize) {
        // try_with: the thread's counters may already be gone while it exits.
        let _ = BYTES.try_with(|b| b.set(b.get() + bytes));
        let _ = BLOCKS.try_with(|b| b.set(b.get() + blocks));
    }

    // SAFETY: every call forwards to `System` with the same arguments; counting allocates
    // nothing.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded as is.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                note(chunk(layout.size()), 1);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded as is.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                note(chunk(layout.size()), 1);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded as is.
            unsafe { System.dealloc(ptr, layout) };
            note(-chunk(layout.size()), -1);
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: forwarded as is.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                note(chunk(new_size) - chunk(layout.size()), 0);
            }
            p
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Heap held: bytes as malloc takes them, and allocations.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub(crate) struct Held {
        /// Bytes, malloc's headers and rounding included.
        pub bytes: isize,
        /// Live allocations.
        pub blocks: isize,
    }

    /// What this thread holds now.
    pub(crate) fn now() -> Held {
        Held {
            bytes: BYTES.with(Cell::get),
            blocks: BLOCKS.with(Cell::get),
        }
    }

    /// Runs `f` and returns its value with what this thread holds more afterwards (what the
    /// value keeps, and anything `f` stored elsewhere).
    pub(crate) fn kept_by<T>(f: impl FnOnce() -> T) -> (T, Held) {
        let before = now();
        let value = f();
        let after = now();
        (
            value,
            Held {
                bytes: after.bytes - before.bytes,
                blocks: after.blocks - before.blocks,
            },
        )
    }
}
