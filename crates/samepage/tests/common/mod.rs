//! Helpers shared by the Linux tests.
#![allow(dead_code)]

use samepage::{Counters, Engine, Run, Tunables};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Memory figures are per process: tests that measure them run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

pub const PAGE: usize = 4096;

/// Full speed, as the tests want it.
pub fn fast(max_page_sharing: u32, use_zero_pages: bool) -> Tunables {
    Tunables {
        run: Run::Merge,
        pages_to_scan: 4096,
        sleep_millisecs: 0,
        max_page_sharing,
        use_zero_pages,
        ..Tunables::default()
    }
}

/// Waits until the counters have not changed for `quiet` full scans (at least 3 scans).
pub fn converge(engine: &Engine, quiet: u64) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(120);
    let key = |c: &Counters| (c.pages_shared, c.pages_sharing, c.ksm_zero_pages, c.pages_unshared);
    let mut last = engine.counters().unwrap();
    let mut since = last.full_scans;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let c = engine.counters().unwrap();
        if key(&c) != key(&last) {
            since = c.full_scans;
        } else if c.full_scans >= since + quiet && c.full_scans >= 3 {
            return c;
        }
        last = c;
        assert!(Instant::now() < deadline, "no convergence: {last:?}");
    }
}

/// A field of /proc/self/smaps_rollup, in bytes.
pub fn rollup(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            if let Some(v) = rest.strip_prefix(':') {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb * 1024;
            }
        }
    }
    panic!("no {field} in smaps_rollup")
}

/// A field of /proc/meminfo, in bytes.
pub fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
            return kb * 1024;
        }
    }
    panic!("no {field} in /proc/meminfo")
}

/// Asserts that page `i` of `region` holds `want(i)`, byte for byte, for every page.
pub fn assert_content(region: &samepage::Region, want: impl Fn(usize) -> [u8; PAGE]) {
    let mut buf = [0u8; PAGE];
    for i in 0..region.len() / PAGE {
        region.read(i * PAGE, &mut buf).unwrap();
        assert!(buf == want(i), "page {i} differs");
    }
}

/// Deterministic page content for `(kind, id)`.
pub fn content(id: u64) -> [u8; PAGE] {
    let mut p = [0u8; PAGE];
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_ne_bytes());
    }
    p
}

/// Mappings of the pool inside `[start, end)`.
pub fn pool_mappings_in(start: usize, end: usize) -> usize {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    text.lines()
        .filter(|l| l.contains("samepage-pool"))
        .filter(|l| {
            let (a, b) = l.split_whitespace().next().unwrap().split_once('-').unwrap();
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            a < end && start < b
        })
        .count()
}

/// Pages inside `[start, end)` that map the pool and were not copied since,
/// recounted from `/proc/self/smaps` (pool mappings' size minus their
/// `Anonymous` pages): the truth the engine's merged-page counters must match.
pub fn pool_pages_in(start: usize, end: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut pages, mut inside) = (0i64, false);
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            inside = l.contains("samepage-pool") && a >= start && b <= end;
            if inside {
                pages += ((b - a) / PAGE) as i64;
            }
        } else if inside {
            if let Some(v) = l.strip_prefix("Anonymous:") {
                let kb: i64 = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                pages -= kb * 1024 / PAGE as i64;
            }
        }
    }
    pages as u64
}

/// The sum of an smaps field (`AnonHugePages`, `Anonymous`...) over the
/// mappings inside `[start, end)`, in bytes.
pub fn smaps_sum_in(field: &str, start: usize, end: usize) -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut sum, mut inside) = (0, false);
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            inside = a >= start && b <= end;
        } else if let Some(v) = l.strip_prefix(field).and_then(|r| r.strip_prefix(':')).filter(|_| inside) {
            sum += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024;
        }
    }
    sum
}
