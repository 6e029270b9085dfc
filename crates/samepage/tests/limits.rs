//! The VMA budget: with `vm.max_map_count` lowered, the engine stops short of
//! it and the program's own mmap calls keep succeeding (root only: lowering
//! the sysctl needs it).

mod common;
use common::*;
use samepage::testing::count_mappings as mappings;
use samepage::Engine;

struct RestoreMapCount(u64);
impl Drop for RestoreMapCount {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/max_map_count", self.0.to_string());
    }
}

#[test]
fn the_programs_mmap_keeps_working_when_the_limit_is_low() {
    let _g = serial();
    let old: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap();
    let now = mappings();
    let low = now + 4000;
    if std::fs::write("/proc/sys/vm/max_map_count", low.to_string()).is_err() {
        eprintln!("skipped: lowering vm.max_map_count needs root");
        return;
    }
    let _restore = RestoreMapCount(old);
    let engine = Engine::new(fast(256, false)).unwrap();
    // 8192 scattered duplicates: far more isolated merges than the budget allows.
    let pages = 16384;
    let region = engine.alloc_region(pages * PAGE).unwrap();
    for i in 0..pages {
        let c = if i % 2 == 0 { content(i as u64 % 7) } else { content(1_000_000 + i as u64) };
        region.write(i * PAGE, &c).unwrap();
    }
    // (Over budget the counters keep moving: pairs form, cannot be mapped and
    // dissolve; so wait for scans rather than for convergence.)
    // (Counted from here: an idle engine with sleep_millisecs 0 has already
    // ended many empty full scans.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let start = engine.counters().unwrap().full_scans;
    while engine.counters().unwrap().full_scans < start + 20 {
        assert!(std::time::Instant::now() < deadline, "the scanner stalled");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let c = engine.counters().unwrap();
    assert!(c.vma_budget_skips > 0, "the budget stopped the engine: {c:?}");
    assert!(c.pages_sharing > 100, "it merged what fit: {c:?}");
    assert!(mappings() < low, "the engine stayed under the limit");
    // The program's own mappings: 1000 separate ones (alternating protections
    // so neighbours cannot merge), all of which must succeed.
    let mut maps = Vec::new();
    for i in 0..1000 {
        let prot = if i % 2 == 0 { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED, "the program's mmap #{i} failed with the engine running");
        maps.push(p);
    }
    for p in maps {
        // SAFETY: our own mappings from above.
        unsafe { libc::munmap(p, PAGE) };
    }
    let mut buf = [0u8; PAGE];
    for i in (0..pages).step_by(97) {
        region.read(i * PAGE, &mut buf).unwrap();
        let want = if i % 2 == 0 { content(i as u64 % 7) } else { content(1_000_000 + i as u64) };
        assert!(buf == want, "page {i}");
    }
}
