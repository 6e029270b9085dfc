//! The program takes part of a registered range back
//! (`Engine::unregister_range`) and unmaps, moves and protects it while the
//! engine keeps scanning the rest. A read of the unmapped or `PROT_NONE`
//! pages by the engine would kill this test with SIGSEGV.

mod common;
use common::*;
use samepage::testing as mem;
use samepage::{Engine, Error};

const N: usize = 1024;

fn want(i: usize) -> [u8; PAGE] {
    content((i % 16) as u64)
}

/// Reads page `i` of the range at `base` (raw, volatile: the engine maps pages under us).
fn page_at(base: usize, i: usize) -> [u8; PAGE] {
    let mut buf = [0u8; PAGE];
    for (k, b) in buf.iter_mut().enumerate() {
        // SAFETY: the caller names a mapped, readable page.
        *b = unsafe { std::ptr::read_volatile((base + i * PAGE + k) as *const u8) };
    }
    buf
}

fn fill(base: usize, pages: std::ops::Range<usize>) {
    for i in pages {
        let c = want(i);
        // SAFETY: a mapped, writable page of this test's mapping.
        unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), (base + i * PAGE) as *mut u8, PAGE) };
    }
}

#[test]
fn released_parts_can_be_unmapped_moved_and_protected_while_the_rest_merges() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    // SAFETY: a fresh mapping of this test.
    let base = mem::map_anon(N * PAGE).unwrap();
    fill(base, 0..N);
    // SAFETY: the test keeps the mapping until it unregisters; parts are
    // released with unregister_range before they are unmapped, moved or protected.
    let whole = unsafe { engine.register(base as *mut u8, N * PAGE) }.unwrap();
    let c = converge(&engine, 2);
    assert_eq!((c.pages_shared, c.pages_sharing), (16, N as u64 - 16), "{c:?}");

    // Ranges that are not one region's are refused.
    let bad = engine.unregister_range((base + (N - 8) * PAGE) as *mut u8, 16 * PAGE).unwrap_err();
    assert!(matches!(bad, Error::NotRegistered { .. }), "{bad}");
    let bad = engine.unregister_range((base + 1) as *mut u8, PAGE).unwrap_err();
    assert!(matches!(bad, Error::Unaligned { .. }), "{bad}");

    // Pages 256..512 go back to the program.
    let part = |i: usize| base + i * PAGE;
    engine.unregister_range(part(256) as *mut u8, 256 * PAGE).unwrap();
    let rc = engine.region_counters(whole).unwrap();
    assert_eq!(rc.ksm_merging_pages, (N - 256) as u64, "{rc:?}");
    assert_eq!(pool_mappings_in(part(256), part(512)), 0, "pool mappings left in the released part");
    // Still registered: refused.
    // SAFETY: refused before anything happens.
    let overlap = unsafe { engine.register(part(100) as *mut u8, PAGE) }.unwrap_err();
    assert!(matches!(overlap, Error::Overlap { .. }), "{overlap}");

    // SAFETY: released above; nothing of the test uses these pages meanwhile.
    let moved = unsafe { mem::remap_anywhere(part(320), 64 * PAGE) }.unwrap();
    // SAFETY: as above.
    unsafe { mem::unmap(part(256), 64 * PAGE) }.unwrap();
    // SAFETY: as above.
    unsafe { mem::protect(part(384), 64 * PAGE, false, false) }.unwrap();
    // SAFETY: as above.
    unsafe { mem::protect(part(448), 64 * PAGE, true, false) }.unwrap();
    // The engine scans on around the holes, the moved and the protected pages.
    let before = engine.counters().unwrap().full_scans;
    while engine.counters().unwrap().full_scans < before + 4 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let c = converge(&engine, 2);
    assert_eq!((c.pages_shared, c.pages_sharing), (16, N as u64 - 256 - 16), "{c:?}");
    assert!(engine.failure().is_none());
    for j in 0..64 {
        assert!(page_at(moved, j) == want(320 + j), "moved page {j}");
        assert!(page_at(base, 448 + j) == want(448 + j), "read-only page {}", 448 + j);
    }
    for i in (0..256).chain(512..N) {
        assert!(page_at(base, i) == want(i), "page {i}");
    }

    // Everything back in place, registered again as a second region: it merges too.
    // SAFETY: the released range is the test's; `moved` is its own mapping.
    unsafe { mem::move_mapping(moved, 64 * PAGE, part(320)) }.unwrap();
    // SAFETY: the released range is the test's, unused.
    unsafe { mem::map_anon_fixed(part(256), 64 * PAGE) }.unwrap();
    // SAFETY: as above.
    unsafe { mem::protect(part(384), 128 * PAGE, true, true) }.unwrap();
    fill(base, 256..320);
    // SAFETY: as above.
    let again = unsafe { engine.register(part(256) as *mut u8, 256 * PAGE) }.unwrap();
    let c = converge(&engine, 2);
    assert_eq!((c.pages_shared, c.pages_sharing), (16, N as u64 - 16), "{c:?}");
    for i in 0..N {
        assert!(page_at(base, i) == want(i), "page {i} after re-registering");
    }

    // Unregistering both leaves nothing merged and the pool empty.
    engine.unregister(whole).unwrap();
    engine.unregister(again).unwrap();
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing, c.rmap_items), (0, 0, 0), "{c:?}");
    assert_eq!(pool_mappings_in(base, base + N * PAGE), 0);
    for i in 0..N {
        assert!(page_at(base, i) == want(i), "page {i} after unregistering");
    }
    // SAFETY: unregistered; the test's own mapping.
    unsafe { mem::unmap(base, N * PAGE) }.unwrap();
}
