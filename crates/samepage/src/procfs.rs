//! Memory as the OS reports it: `/proc/meminfo` and `/proc/self/smaps_rollup`.

use std::fs;

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(':')?;
        let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// A `/proc/meminfo` field (such as `AnonPages`, `Shmem`, `MemAvailable`) in bytes.
pub fn meminfo(name: &str) -> Option<u64> {
    field(&fs::read_to_string("/proc/meminfo").ok()?, name)
}

/// A `/proc/self/smaps_rollup` field (such as `Anonymous`, `Rss`, `Shared_Clean`) in bytes.
pub fn smaps_rollup(name: &str) -> Option<u64> {
    field(&fs::read_to_string("/proc/self/smaps_rollup").ok()?, name)
}

/// Mappings of this process (lines of `/proc/self/maps`).
pub fn mappings() -> u64 {
    crate::sys::vma::count_mappings()
}
