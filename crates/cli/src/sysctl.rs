//! `vm.max_map_count`, raised for a run and restored after.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};

/// The limit to restore if a signal ends the process (0: nothing to restore).
static OLD: AtomicU64 = AtomicU64::new(0);
/// Held while the limit changes; `true` once a signal handler restored it.
static SIGNALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

const PATH: &str = "/proc/sys/vm/max_map_count";

/// Restores the old `vm.max_map_count` on drop.
pub struct MapCountGuard {
    old: u64,
}

/// Raises the limit to `want` if it is lower and we may (root). Returns the
/// guard and the old value, or `None` if nothing was changed.
pub fn raise(want: u64) -> Option<(MapCountGuard, u64)> {
    let signalled = SIGNALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *signalled {
        return None;
    }
    let old = max_map_count();
    if old >= want {
        return None;
    }
    fs::write(PATH, want.to_string()).ok()?;
    OLD.store(old, Ordering::SeqCst);
    Some((MapCountGuard { old }, old))
}

impl Drop for MapCountGuard {
    fn drop(&mut self) {
        let _g = SIGNALLED.lock().unwrap_or_else(|e| e.into_inner());
        if OLD.swap(0, Ordering::SeqCst) != 0 {
            let _ = fs::write(PATH, self.old.to_string());
        }
    }
}

/// Restores the limit from a signal handler, if a guard is alive.
pub fn restore_after_signal() {
    let mut signalled = SIGNALLED.lock().unwrap_or_else(|e| e.into_inner());
    *signalled = true;
    let old = OLD.swap(0, Ordering::SeqCst);
    if old != 0 {
        let _ = fs::write(PATH, old.to_string());
    }
}

/// `vm.max_map_count` now.
pub fn max_map_count() -> u64 {
    fs::read_to_string(PATH).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}
