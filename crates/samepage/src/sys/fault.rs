//! Fault injection: make the engine's own system calls fail, or its thread
//! panic, on purpose, to test that every failure is skipped and counted with
//! nothing left half done (the kernel has the same for its allocations:
//! `failslab`, `fail_page_alloc`).
//!
//! Off unless a test turns it on: one relaxed atomic load per guarded call.
//! The setting is process-wide.

use super::SysError;
use rustix::io::Errno;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The `mmap(MAP_FIXED)` of a pool run over a page being merged.
    MapPool,
    /// `UFFDIO_WRITEPROTECT` opening a merge window.
    WriteProtect,
    /// The anonymous `mmap` that unmerging copies into (the memory an
    /// unmerge needs).
    MapAnon,
    /// The scanner thread panics at its next batch.
    ScannerPanic,
}

const POINTS: usize = 4;
static EVERY: [AtomicU64; POINTS] = [const { AtomicU64::new(0) }; POINTS];
static CALLS: [AtomicU64; POINTS] = [const { AtomicU64::new(0) }; POINTS];
static ERRNO: [AtomicU64; POINTS] = [const { AtomicU64::new(0) }; POINTS];
static INJECTED: [AtomicU64; POINTS] = [const { AtomicU64::new(0) }; POINTS];

/// Makes every `every`-th call at `point` fail with `errno` (`every == 0`
/// turns the point off; 1 fails every call).
#[cfg(feature = "testing")]
pub fn inject(point: Point, every: u64, errno: Errno) {
    let p = point as usize;
    ERRNO[p].store(errno.raw_os_error() as u64, Ordering::Relaxed);
    CALLS[p].store(0, Ordering::Relaxed);
    EVERY[p].store(every, Ordering::Relaxed);
}

/// Turns every point off.
#[cfg(feature = "testing")]
pub fn clear() {
    for every in &EVERY {
        every.store(0, Ordering::Relaxed);
    }
}

/// Faults injected at `point` so far.
#[cfg(feature = "testing")]
pub fn injected(point: Point) -> u64 {
    INJECTED[point as usize].load(Ordering::Relaxed)
}

/// `Err` (as if the call named `op` had failed) when a fault is due at `point`.
pub(crate) fn check(point: Point, op: &'static str) -> Result<(), SysError> {
    let p = point as usize;
    let every = EVERY[p].load(Ordering::Relaxed);
    if every == 0 || !(CALLS[p].fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(every) {
        return Ok(());
    }
    INJECTED[p].fetch_add(1, Ordering::Relaxed);
    Err(SysError::new(op, Errno::from_raw_os_error(ERRNO[p].load(Ordering::Relaxed) as i32)))
}

/// Set: engines started from now on read `/proc/self/pagemap` instead of
/// using `PAGEMAP_SCAN`, as on kernels before 6.7.
static PAGEMAP_FALLBACK: AtomicBool = AtomicBool::new(false);

/// Makes engines started from now on (`on`) read `/proc/self/pagemap` as
/// kernels without `PAGEMAP_SCAN` (before 6.7) make them, or (`!on`) use
/// `PAGEMAP_SCAN` where the kernel has it. Process-wide.
#[cfg(feature = "testing")]
pub fn force_pagemap_fallback(on: bool) {
    PAGEMAP_FALLBACK.store(on, Ordering::Relaxed);
}

/// Whether [`force_pagemap_fallback`] is on.
pub(crate) fn pagemap_fallback_forced() -> bool {
    PAGEMAP_FALLBACK.load(Ordering::Relaxed)
}
