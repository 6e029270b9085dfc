//! Merging on real memory: memory freed as /proc reports it, counters, unmerge.

mod common;
use common::*;
use samepage::{Engine, Run};

/// 8192 pages: 16 contents × 256 copies each... in 4 "files" laid out as runs,
/// plus 1024 unique pages. Returns the expected content of each page.
fn fill(region: &samepage::Region) -> Vec<[u8; PAGE]> {
    let pages = region.len() / PAGE;
    let mut want = Vec::with_capacity(pages);
    for i in 0..pages {
        let c = if i % 8 == 7 { content(1_000_000 + i as u64) } else { content((i % 64) as u64) };
        region.write(i * PAGE, &c).unwrap();
        want.push(c);
    }
    want
}

fn check(region: &samepage::Region, want: &[[u8; PAGE]]) {
    assert_content(region, |i| want[i]);
}

#[test]
fn merging_frees_memory_as_proc_reports_it() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let region = engine.alloc_region(8192 * PAGE).unwrap();
    engine.set_run(Run::Stop).unwrap();
    let want = fill(&region);
    let anon_before = rollup("Anonymous");
    let shmem_before = meminfo("Shmem");
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    // 7168 pages in 56 contents of 128 copies: 56 stable pages, 7112 sharing.
    assert_eq!((c.pages_shared, c.pages_sharing), (56, 7168 - 56), "{c:?}");
    // The unique pages are in the unstable tree, or (skipped by smart_scan,
    // as the kernel's are) in no tree.
    assert_eq!(c.pages_unshared + c.pages_volatile, 1024, "{c:?}");
    let rc = engine.region_counters(region.id()).unwrap();
    assert_eq!(rc.ksm_merging_pages, 7168);
    let freed = anon_before.saturating_sub(rollup("Anonymous"));
    eprintln!("{c:?}\nanon before {anon_before} freed {freed} stats {:?}", engine.space_stats());
    let dup_bytes = (c.pages_sharing * PAGE as u64) as f64;
    assert!(freed as f64 >= 0.95 * dup_bytes, "freed {freed} of {dup_bytes} duplicate bytes");
    let shmem_grew = meminfo("Shmem").saturating_sub(shmem_before);
    assert!(shmem_grew <= 56 * PAGE as u64 + (4 << 20), "the pool holds the stable pages only: +{shmem_grew}");
    check(&region, &want);
    // Runs of consecutive copies merge as runs: far fewer mappings than pages.
    let start = region.as_ptr() as usize;
    let maps = pool_mappings_in(start, start + region.len());
    assert!(maps < 7168 / 4, "{maps} pool mappings for 7168 merged pages");

    // run = 2: everything private again, content intact, pool emptied.
    engine.set_run(Run::Unmerge).unwrap();
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing, c.ksm_zero_pages), (0, 0, 0), "{c:?}");
    check(&region, &want);
    assert_eq!(pool_mappings_in(start, start + region.len()), 0);
    assert!(rollup("Anonymous") >= anon_before - (1 << 20));
}

/// The PFN behind an address (root sees PFNs in /proc/self/pagemap; 0 otherwise).
fn pfn(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / PAGE * 8) as u64).unwrap();
    u64::from_ne_bytes(b) & ((1 << 55) - 1)
}

#[test]
fn identical_pages_in_two_domains_stay_separate() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let a = engine.alloc_region_in(64 * PAGE, samepage::Domain(1)).unwrap();
    let b = engine.alloc_region_in(64 * PAGE, samepage::Domain(2)).unwrap();
    for i in 0..64 {
        a.write(i * PAGE, &content(7)).unwrap();
        b.write(i * PAGE, &content(7)).unwrap();
    }
    let c = converge(&engine, 1);
    assert_eq!((c.pages_shared, c.pages_sharing), (2, 126), "one stable page per domain: {c:?}");
    assert_eq!(engine.region_counters(a.id()).unwrap().ksm_merging_pages, 64);
    assert_eq!(engine.region_counters(b.id()).unwrap().ksm_merging_pages, 64);
    // Independently, from the page tables: touch, then compare physical pages.
    let mut buf = [0u8; 8];
    for r in [&a, &b] {
        for i in 0..64 {
            r.read(i * PAGE, &mut buf).unwrap();
        }
    }
    let (a0, a1, b0) = (pfn(a.as_ptr() as usize), pfn(a.as_ptr() as usize + PAGE), pfn(b.as_ptr() as usize));
    if a0 != 0 {
        assert_eq!(a0, a1, "pages of one domain share a physical page");
        assert_ne!(a0, b0, "pages of two domains never do");
    }
}

/// Copy-on-write churn leaves dups sparse; defragmentation refiles their
/// mappings (remapping live pages under the write-protect window) until each
/// content keeps `ceil(mappings / max_page_sharing)` dups, bytes intact.
#[test]
fn defrag_refiles_sparse_dups_on_real_memory() {
    let _g = serial();
    let mut t = fast(4, false);
    t.stable_node_chains_prune_millisecs = 50;
    let engine = Engine::new(t).unwrap();
    let pages = 512;
    let region = engine.alloc_region(pages * PAGE).unwrap();
    let mut want: Vec<[u8; PAGE]> = (0..pages).map(|i| content(i as u64 % 2)).collect();
    for (i, w) in want.iter().enumerate() {
        region.write(i * PAGE, w).unwrap();
    }
    let c = converge(&engine, 1);
    assert_eq!(c.stable_node_dups, 128, "{c:?}");
    // Write three pages in four: they become unique, the dups sparse.
    let mut rng = fastrand::Rng::with_seed(3);
    let mut left = [0u64; 2];
    for (i, w) in want.iter_mut().enumerate() {
        if rng.u8(..4) != 0 {
            // Unique from now on: the page's index goes into it.
            w[200..208].copy_from_slice(&(i as u64 | 1 << 40).to_ne_bytes());
            region.write(i * PAGE + 200, &w[200..208]).unwrap();
        } else {
            left[i % 2] += 1;
        }
    }
    let minimum: u64 = left.iter().map(|m| m.div_ceil(4)).sum();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let c = loop {
        let c = engine.counters().unwrap();
        if c.pages_shared == minimum && c.pages_sharing == left.iter().sum::<u64>() - minimum {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "dups never reached the minimum {minimum}: {c:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(c.stable_node_refiled > 0, "{c:?}");
    check(&region, &want);
}

#[test]
fn nothing_is_left_after_every_region_is_unregistered() {
    let _g = serial();
    let shmem_start = meminfo("Shmem");
    // smart_scan off: the unique pages then sit still in the unstable tree, so
    // the counters settle.
    let engine = Engine::new(samepage::Tunables { smart_scan: false, ..fast(4, true) }).unwrap();
    let fresh = engine.counters().unwrap().metadata_bytes;
    let regions: Vec<_> = (0..3).map(|_| engine.alloc_region(4096 * PAGE).unwrap()).collect();
    for (k, r) in regions.iter().enumerate() {
        for i in 0..4096 {
            let c = match i % 4 {
                0 => [0; PAGE],
                1 => content(1_000_000 + (k * 10_000 + i) as u64),
                _ => content((i % 32) as u64),
            };
            r.write(i * PAGE, &c).unwrap();
        }
    }
    let c = converge(&engine, 2);
    // Zero pages, chains of dups (max_page_sharing 4), unique pages in the trees.
    assert!(c.pages_sharing > 0 && c.ksm_zero_pages > 0 && c.stable_node_chains > 0, "{c:?}");
    assert!(c.metadata_bytes > fresh + 100_000, "{c:?}");
    assert!(meminfo("Shmem") >= shmem_start + c.pages_shared * PAGE as u64 / 2, "the pool holds the stable pages");
    drop(regions); // each unregisters
    let c = engine.counters().unwrap();
    assert_eq!(
        (c.pages_shared, c.pages_sharing, c.ksm_zero_pages, c.rmap_items, c.stable_node_chains, c.stable_node_dups),
        (0, 0, 0, 0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.pool_slots_pending, 0);
    // The engine's metadata is what a fresh engine holds; the pool is empty.
    assert!(c.metadata_bytes <= fresh + 4096, "metadata {} after, {fresh} fresh", c.metadata_bytes);
    let grew = meminfo("Shmem").saturating_sub(shmem_start);
    assert!(grew < 1 << 20, "Shmem still {grew} bytes above where it started");
}

/// Merging on request: with `run = 0` nothing merges by itself;
/// `merge_now` merges the range asked for, right away, and reports what it
/// saved; the rest of the region stays private; every byte is kept.
#[test]
fn merge_now_merges_the_range_asked_for_at_once() {
    let _g = common::serial();
    let engine = Engine::new(samepage::Tunables { run: Run::Stop, ..common::fast(256, false) }).unwrap();
    let region = engine.alloc_region(64 * PAGE).unwrap();
    for i in 0..64 {
        region.write(i * PAGE, &common::content(i as u64 % 4)).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(engine.counters().unwrap().pages_sharing, 0, "run = 0 merges nothing by itself");
    let base = region.as_ptr() as usize;
    let m = engine.merge_now((base + 16 * PAGE) as *mut u8, 32 * PAGE).unwrap();
    assert_eq!(m, samepage::Merged { pages: 32, saved_bytes: 28 * PAGE as u64 });
    let c = engine.counters().unwrap();
    assert_eq!((c.pages_shared, c.pages_sharing), (4, 28), "{c:?}");
    assert_eq!(common::smaps_sum_in("Anonymous", base + 16 * PAGE, base + 48 * PAGE), 0, "the range maps the pool");
    assert_eq!(common::smaps_sum_in("Anonymous", base, base + 16 * PAGE), (16 * PAGE) as u64, "the rest is private");
    let mut buf = [0u8; PAGE];
    for i in 0..64 {
        region.read(i * PAGE, &mut buf).unwrap();
        assert!(buf == common::content(i as u64 % 4), "page {i}");
    }
    let bad = engine.merge_now((base + 1) as *mut u8, PAGE).unwrap_err();
    assert_eq!(bad.errno(), Some(22), "{bad}");
}

/// `pages_to_scan` counts the merged pages a batch passes, as the kernel's
/// `ksm_do_scan` counts every page it visits: with 4096 pages merged and
/// `pages_to_scan` 256, a full scan takes 16 batches. (A page still mapping
/// its stable page is never read, but it used to cost nothing against the
/// budget either, so every batch over merged memory walked all of it: a full
/// scan per batch, 50 a second at `sleep_millisecs` 20.)
#[test]
fn pages_to_scan_counts_merged_pages_as_the_kernel_does() {
    let _g = serial();
    let engine = Engine::new(fast(256, false)).unwrap();
    let region = engine.alloc_region(4096 * PAGE).unwrap();
    engine.set_run(Run::Stop).unwrap();
    for i in 0..4096 {
        region.write(i * PAGE, &content((i % 16) as u64)).unwrap();
    }
    engine.set_run(Run::Merge).unwrap();
    let c = converge(&engine, 2);
    assert_eq!(c.pages_shared + c.pages_sharing, 4096, "{c:?}");
    let mut t = engine.tunables().unwrap();
    t.pages_to_scan = 256;
    t.sleep_millisecs = 1;
    engine.set_tunables(t).unwrap();
    // From a full scan's start, so that batches and full scans line up.
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "waited a minute for {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    let f = engine.counters().unwrap().full_scans;
    wait("a full scan", &|| engine.counters().unwrap().full_scans > f + 1);
    let (b0, f0) = (engine.batches(), engine.counters().unwrap().full_scans);
    wait("160 batches", &|| engine.batches() >= b0 + 160);
    let (b1, f1) = (engine.batches(), engine.counters().unwrap().full_scans);
    let (batches, scans) = (b1 - b0, f1 - f0);
    assert!(
        scans + 1 >= batches / 16 && scans <= batches / 16 + 1,
        "{scans} full scans in {batches} batches of 256 pages over 4096 merged pages (16 batches each)"
    );
    let c = engine.counters().unwrap();
    assert_eq!(c.pages_shared + c.pages_sharing, 4096, "still merged: {c:?}");
}

/// Walking a large hole (a guest's RAM not touched yet) costs a few
/// page-table walks per full scan: a chunk that finds nothing present doubles
/// the next one's span, which `pages_to_scan` otherwise bounds.
#[test]
fn a_large_hole_costs_a_few_walks_per_full_scan() {
    let _g = serial();
    let engine = Engine::new(samepage::Tunables { pages_to_scan: 100, ..fast(256, false) }).unwrap();
    let region = engine.alloc_region(1 << 30).unwrap();
    // Small pages only: with transparent huge pages `always` the two writes
    // would fault in 2 MiB of zeros, which merge too.
    engine.advise(region.as_ptr(), region.len(), samepage::Advice::NoHugePage).unwrap();
    let n = (1 << 30) / PAGE;
    region.write((n - 2) * PAGE, &content(7)).unwrap();
    region.write((n - 1) * PAGE, &content(7)).unwrap();
    let c = converge(&engine, 2);
    assert_eq!((c.pages_shared, c.pages_sharing), (1, 1), "{c:?}");
    let (s0, f0) = (engine.space_stats().pagemap_scans, c.full_scans);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while engine.counters().unwrap().full_scans < f0 + 10 {
        assert!(std::time::Instant::now() < deadline, "10 full scans in a minute");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (s1, f1) = (engine.space_stats().pagemap_scans, engine.counters().unwrap().full_scans);
    let walks = (s1 - s0) / (f1 - f0);
    assert!(walks <= 40, "{walks} page-table walks per full scan of 1 GiB holding 2 pages");
}
