//! Helpers shared by the Linux tests.
#![allow(dead_code, reason = "each test file uses some of the helpers")]

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

/// Waits until the counters have not changed for `quiet` full scans, and at
/// least four full scans have ended since the call.
///
/// Counted from the call, not from the engine's start: with `sleep_millisecs`
/// 0 an engine finishes hundreds of empty full scans before the test's pages
/// exist, and a page needs two scans over its final content (checksum, then
/// the unstable tree) before anything merges, plus the one in progress at the
/// call. Counting from the engine's start let a CI run return after a single
/// scan with every page still volatile.
pub fn converge(engine: &Engine, quiet: u64) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(120);
    let key = |c: &Counters| (c.pages_shared, c.pages_sharing, c.ksm_zero_pages, c.pages_unshared);
    let mut last = engine.counters().unwrap();
    let start = last.full_scans;
    let mut since = last.full_scans;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let c = engine.counters().unwrap();
        if key(&c) != key(&last) {
            since = c.full_scans;
        } else if c.full_scans >= since + quiet && c.full_scans >= start + 4 {
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

/// The `VmFlags` of every mapping inside `[start, end)`, one string each.
pub fn vm_flags_in(start: usize, end: usize) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut out, mut inside) = (Vec::new(), false);
    for l in text.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            inside = a >= start && b <= end;
        } else if let Some(v) = l.strip_prefix("VmFlags:").filter(|_| inside) {
            out.push(v.trim().to_string());
        }
    }
    out
}

/// A file of `pages` pages of deterministic content (page `i` holds
/// `content(seed + i)`), for O_DIRECT and io_uring reads.
pub fn data_file(name: &str, pages: usize, seed: u64) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("samepage-{name}-{}", std::process::id()));
    let data: Vec<u8> = (0..pages).flat_map(|i| content(seed + i as u64)).collect();
    std::fs::write(&path, data).unwrap();
    path
}

/// Forks a child that runs `check` (raw memory reads only, no allocation)
/// and exits 0 if it returns true; returns whether it did.
pub fn in_child(check: impl FnOnce() -> bool) -> bool {
    // SAFETY: the child only runs `check`, which touches raw memory, then
    // leaves with _exit: no locks, no destructors.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = check();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Whether `[addr, addr + len)` is mapped at all (`mincore` fails with ENOMEM otherwise).
pub fn is_mapped(addr: usize, len: usize) -> bool {
    let mut v = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: mincore only reports on the range and writes one byte per page into `v`.
    unsafe { libc::mincore(addr as *mut libc::c_void, len, v.as_mut_ptr()) == 0 }
}

/// A field of /proc/self/status, in kB.
pub fn status_kb(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}
