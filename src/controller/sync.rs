//! The controller's lock policy, in one place every module may use.
//!
//! Lives here: [`lock`]. Every mutex in the controller guards plain data whose updates cannot
//! panic half-way, so a poisoned lock is recovered rather than turned into an error or a panic.
//! Must not live here: anything that knows what a lock guards.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering the guard if a panic poisoned it (see the module comment).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
