//! Giving the allocator's free memory back to the system.
//!
//! Lives here: [`limit_arenas`] (at most [`MAX_ARENAS`] glibc arenas, set before the runtime
//! starts its threads), [`spawn_trimmer`], which every [`TRIM_PERIOD`] asks glibc's allocator to
//! return the free pages it holds inside its arenas (`malloc_trim`), and [`trim`]. Must not live
//! here: what the operator keeps per pool (`context`, `projection`).
//!
//! Why: glibc returns memory to the system only from the top of an arena. A burst (10,000 pools'
//! first statuses waiting to be written, a restart's list, an outage's events) leaves its freed
//! blocks scattered inside the arenas, and the process's RSS stays at the burst's height: at
//! 10,000 pools 100–140 MiB of the 450–500 MiB RSS was free memory the allocator held
//! (docs/benchmarks.md, issue 29). `malloc_trim(0)` releases every whole free page (madvise), so
//! a steady operator's RSS follows what it really keeps. glibc also gives each thread that meets
//! contention an arena of its own (up to 8 per core), and a block freed in one arena serves only
//! the threads of that arena: at 10,000 pools the process had its main heap and four 64 MiB
//! arenas. Two arenas for the runtime's threads keep the freed memory of one worker usable by
//! the other. On other C libraries both do nothing.

use std::time::Duration;

/// How often the free memory is given back (each call walks the arenas' free lists, holding
/// each arena's lock meanwhile, on a blocking thread; its time is logged at debug level).
pub(super) const TRIM_PERIOD: Duration = Duration::from_secs(60);

/// The most glibc arenas the process uses (`M_ARENA_MAX`; glibc's default is 8 per core).
pub const MAX_ARENAS: i32 = 2;

/// Limits the allocator to [`MAX_ARENAS`] arenas (`mallopt(M_ARENA_MAX)`). Call it before any
/// thread is started (before the async runtime): a thread keeps the arena it first took. The
/// `MALLOC_ARENA_MAX` variable, when set, wins. True when the setting was applied.
pub fn limit_arenas() -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// glibc's `M_ARENA_MAX` (malloc.h).
        const M_ARENA_MAX: std::ffi::c_int = -8;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX is valid at any time
        // and takes effect for arenas created afterwards.
        unsafe { mallopt(M_ARENA_MAX, MAX_ARENAS) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Gives the free memory back every [`TRIM_PERIOD`] until the returned task is aborted.
pub(super) fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(elapsed = ?started.elapsed(), released, "malloc_trim");
        }
    })
}

/// Asks the allocator to return its free pages; true when it released memory.
pub(super) fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes a size and only works on the allocator's own state, under
        // its arena locks; it is safe to call from any thread at any time.
        unsafe { malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// VmRSS of this process, in KiB.
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_blocks_inside_an_arena_go_back_to_the_system() {
        // On a thread of its own (its own arena, as the runtime's workers have): 64 MiB in
        // 2 KiB blocks, touched, then all freed but the last, which pins the arena's top so
        // that only a trim can give the rest back.
        let (before, freed, after) = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..32 * 1024)
                .map(|i| vec![(i % 251) as u8; 2048])
                .collect();
            let before = rss_kib();
            let mut blocks = blocks;
            let last = blocks.pop();
            drop(blocks);
            let freed = rss_kib();
            assert!(trim(), "the allocator released nothing");
            let after = rss_kib();
            drop(last);
            (before, freed, after)
        })
        .join()
        .expect("thread");
        assert!(
            freed + 16 * 1024 > before,
            "freeing alone kept the pages ({before} → {freed} KiB)"
        );
        assert!(
            after + 32 * 1024 <= freed,
            "the trim gave back less than 32 MiB ({freed} → {after} KiB)"
        );
    }
}
