//! `vm.max_map_count`, raised for a run and restored after.

use std::fs;

const PATH: &str = "/proc/sys/vm/max_map_count";

/// Restores the old `vm.max_map_count` on drop.
pub struct MapCountGuard {
    old: u64,
}

/// The current limit.
pub fn max_map_count() -> u64 {
    fs::read_to_string(PATH).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// Raises the limit to `want` if it is lower and we may (root). Returns the
/// guard and the old value, or `None` if nothing was changed.
pub fn raise(want: u64) -> Option<(MapCountGuard, u64)> {
    let old = max_map_count();
    if old >= want {
        return None;
    }
    fs::write(PATH, want.to_string()).ok()?;
    Some((MapCountGuard { old }, old))
}

impl Drop for MapCountGuard {
    fn drop(&mut self) {
        let _ = fs::write(PATH, self.old.to_string());
    }
}
