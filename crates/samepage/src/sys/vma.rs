//! The VMA budget.
//!
//! A merged page whose neighbours do not map the neighbouring pool slots is a
//! mapping of its own (and splits its neighbour's in two). The kernel refuses
//! a process more than `vm.max_map_count` mappings (65530 by default); past
//! it, `mmap`, `mprotect` and `munmap` fail with ENOMEM, the program's own
//! calls included. The engine therefore spends at most a share (default one
//! half) of the headroom it found when it started, and counts what it skipped
//! for that reason. Root may raise the limit (`sysctl vm.max_map_count=N`).

use std::fs;

/// Reads `vm.max_map_count`.
pub fn max_map_count() -> u64 {
    fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// Counts this process's mappings (lines of `/proc/self/maps`).
pub fn count_mappings() -> u64 {
    fs::read("/proc/self/maps").map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64).unwrap_or(0)
}

/// How many mappings the engine may still create.
#[derive(Debug)]
pub struct VmaBudget {
    share: f64,
    baseline: u64,
    limit: u64,
    estimate: u64,
    since_recount: u64,
    refusals: u64,
}

impl VmaBudget {
    /// A budget of `share` (0 to 1) of the current headroom.
    pub fn new(share: f64) -> Self {
        let mut b = VmaBudget {
            share: share.clamp(0.0, 1.0),
            baseline: count_mappings(),
            limit: 0,
            estimate: 0,
            since_recount: 0,
            refusals: 0,
        };
        b.limit = b.compute_limit();
        b.estimate = b.baseline;
        b
    }

    fn compute_limit(&self) -> u64 {
        let max = max_map_count();
        let headroom = max.saturating_sub(self.baseline);
        self.baseline + (headroom as f64 * self.share) as u64
    }

    /// Whether `n` more mappings fit; call [`VmaBudget::spent`] after using them.
    pub fn allows(&mut self, n: u64) -> bool {
        if self.estimate + n <= self.limit {
            return true;
        }
        // The estimate is pessimistic (runs merge with neighbours, the
        // program unmaps): look at the real count after 4096 new mappings,
        // and every 1024 refusals.
        self.refusals += 1;
        if self.since_recount >= 4096 || self.refusals % 1024 == 1 {
            self.recount();
        }
        self.estimate + n <= self.limit
    }

    /// Records `n` mappings created.
    pub fn spent(&mut self, n: u64) {
        self.estimate += n;
        self.since_recount += n;
    }

    /// Forces a recount (after unmerging, which gives mappings back).
    pub fn recount(&mut self) {
        self.limit = self.compute_limit();
        self.estimate = count_mappings();
        self.since_recount = 0;
    }

    /// The most mappings the process may have before the engine stops merging.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}
