//! The `/proc/self/pagemap` fallback (kernels before 6.7 have no
//! `PAGEMAP_SCAN`), forced on: it merges the same content to the same
//! counters. Process-wide switch, so a test binary of its own.

mod common;
use common::*;
use samepage::{Engine, Run};

/// A quarter zero pages, half copies of 8 contents (256 each), a quarter unique.
fn fill(region: &samepage::Region) -> Vec<[u8; PAGE]> {
    let pages = region.len() / PAGE;
    let want: Vec<[u8; PAGE]> = (0..pages)
        .map(|i| match i % 4 {
            0 => [0; PAGE],
            1 | 2 => content((i / 4) as u64 % 8),
            _ => content(1_000_000 + i as u64),
        })
        .collect();
    for (i, w) in want.iter().enumerate() {
        region.write(i * PAGE, w).unwrap();
    }
    want
}

fn merge_with_fallback(use_zero_pages: bool) {
    samepage::testing::force_pagemap_fallback(true);
    let engine = Engine::new(fast(256, use_zero_pages)).unwrap();
    samepage::testing::force_pagemap_fallback(false);
    assert!(!engine.info().pagemap_scan, "the fallback is forced");
    engine.set_run(Run::Stop).unwrap();
    let region = engine.alloc_region(4096 * PAGE).unwrap();
    let want = fill(&region);
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    // 1024 zero pages, 256 copies of each of 8 contents (max_page_sharing 256).
    if use_zero_pages {
        assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages), (8, 2048 - 8, 1024), "{c:?}");
    } else {
        // The zero pages are 4 dups of 256 mappings.
        assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages), (12, 3072 - 12, 0), "{c:?}");
    }
    assert!(c.pages_scanned > 0 && engine.space_stats().pagemap_scans > 0);
    assert_content(&region, |i| want[i]);
    // Converged for good: more scans change nothing.
    let more = converge(&engine, 3);
    assert_eq!(
        (more.pages_shared, more.pages_sharing, more.ksm_zero_pages),
        (c.pages_shared, c.pages_sharing, c.ksm_zero_pages),
        "{more:?}"
    );
    engine.set_run(Run::Unmerge).unwrap();
    assert_content(&region, |i| want[i]);
}

#[test]
fn the_pagemap_fallback_merges_like_pagemap_scan() {
    let _g = serial();
    merge_with_fallback(false);
    merge_with_fallback(true);
}
