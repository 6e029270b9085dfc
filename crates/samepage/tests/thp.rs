//! Transparent huge pages on real memory: with `thp_split_min_subpages` 1 the
//! engine splits every huge page with a duplicate subpage (the kernel's
//! behaviour); with 64, huge pages with fewer mergeable subpages stay huge
//! (smaps `AnonHugePages` shows it) and the rest merge.

mod common;
use common::*;
use samepage::testing::AnonMapping;
use samepage::{Engine, Tunables};

const FRAMES: usize = 16;
const SUB: usize = 512;

/// Frames 0 and 1: 496 of 512 subpages copies of 16 contents; the others:
/// subpage 7 one shared content, the rest unique.
fn want(i: usize) -> [u8; PAGE] {
    let (f, j) = (i / SUB, i % SUB);
    if f < 2 {
        if j % 32 == 31 {
            content(1_000_000 + i as u64)
        } else {
            content((j % 16) as u64)
        }
    } else if j == 7 {
        content(100)
    } else {
        content(1_000_000 + i as u64)
    }
}

/// A /proc/vmstat counter.
fn vmstat(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/vmstat").unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

struct Outcome {
    c: samepage::Counters,
    huge: u64,
    anon_freed: u64,
    /// Huge pages the kernel split into small pages (`thp_split_page`).
    splits: u64,
}

fn run(threshold: u32) -> Option<Outcome> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[never]") || mode.is_empty() {
        eprintln!("transparent huge pages are off on this machine ({mode:?}): nothing to test");
        return None;
    }
    let engine = Engine::new(Tunables { thp_split_min_subpages: threshold, ..fast(256, false) }).unwrap();
    let m = AnonMapping::new_huge(FRAMES * SUB * PAGE).unwrap();
    for i in 0..FRAMES * SUB {
        m.write(i * PAGE, &want(i)).unwrap();
    }
    let (start, end) = (m.as_ptr() as usize, m.as_ptr() as usize + m.len());
    assert_eq!(
        smaps_sum_in("AnonHugePages", start, end),
        m.len() as u64,
        "the kernel gave no huge pages to a MADV_HUGEPAGE mapping"
    );
    let (anon_before, splits_before) = (smaps_sum_in("Anonymous", start, end), vmstat("thp_split_page"));
    // SAFETY: the mapping outlives its registration.
    let id = unsafe { engine.register(m.as_ptr(), m.len()) }.unwrap();
    let c = converge(&engine, 3);
    let huge = smaps_sum_in("AnonHugePages", start, end);
    let anon_freed = anon_before - smaps_sum_in("Anonymous", start, end);
    let splits = vmstat("thp_split_page") - splits_before;
    let mut buf = [0u8; PAGE];
    for i in 0..FRAMES * SUB {
        m.read(i * PAGE, &mut buf).unwrap();
        assert!(buf == want(i), "page {i} differs");
    }
    engine.unregister(id).unwrap();
    Some(Outcome { c, huge, anon_freed, splits })
}

#[test]
fn threshold_one_splits_every_huge_page_with_a_duplicate() {
    let _g = serial();
    let Some(Outcome { c, huge, anon_freed, splits }) = run(1) else { return };
    // 2 x 496 copies of 16 contents (62 each) and 14 copies of one: the kernel's figures.
    assert_eq!((c.pages_shared, c.pages_sharing), (17, 16 * 61 + 13), "{c:?}");
    assert_eq!(huge, 0, "huge pages left");
    // Every merged page's memory is freed: the huge pages were really split
    // (UFFDIO_MOVE splits the folio it takes a subpage from), not left
    // half-mapped on the kernel's deferred-split list holding all 2 MiB.
    assert!(anon_freed >= (c.pages_shared + c.pages_sharing) * PAGE as u64, "freed {anon_freed} {c:?}");
    assert!(splits >= FRAMES as u64, "only {splits} huge pages split into small pages");
    assert_eq!((c.thp_split, c.thp_kept_whole), (FRAMES as u64, 0), "{c:?}");
}

#[test]
fn threshold_keeps_sparse_huge_pages_whole() {
    let _g = serial();
    let Some(Outcome { c, huge, .. }) = run(64) else { return };
    assert_eq!((c.pages_shared, c.pages_sharing), (16, 16 * 61), "{c:?}");
    assert_eq!(huge, (FRAMES as u64 - 2) * (2 << 20), "the 14 sparse huge pages stay huge");
    // 13 of them hold a subpage that would merge with another's.
    assert_eq!((c.thp_kept_whole, c.thp_left_subpages), (13, 13), "{c:?}");
}

#[test]
fn huge_pages_split_under_racing_writes_lose_nothing() {
    let _g = serial();
    for threshold in [1, 64] {
        let engine = Engine::new(Tunables { thp_split_min_subpages: threshold, ..fast(256, true) }).unwrap();
        let m = AnonMapping::new_huge(FRAMES * SUB * PAGE).unwrap();
        for i in 0..FRAMES * SUB {
            m.write(i * PAGE, &want(i)).unwrap();
        }
        let (stop, started) = (std::sync::atomic::AtomicBool::new(false), std::sync::atomic::AtomicBool::new(false));
        let mut id = None;
        let shadow = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                // The unique subpages of the two mostly-duplicate huge pages:
                // the others stay duplicates, so the huge pages are split
                // (UFFDIO_MOVE splits them) and merged while these are written.
                let mut shadow: Vec<[u8; PAGE]> = (0..FRAMES * SUB).map(want).collect();
                let mut rng = fastrand::Rng::with_seed(threshold as u64);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    started.store(true, std::sync::atomic::Ordering::Relaxed);
                    n += 1;
                    // Stop right after both huge pages were split: a write
                    // lost then is not overwritten by a later one.
                    if n.is_multiple_of(64) && engine.counters().unwrap().thp_split >= 2 {
                        break;
                    }
                    let i = rng.usize(..2) * SUB + 31 + 32 * rng.usize(..16);
                    let off = rng.usize(..PAGE);
                    let b = rng.u8(..);
                    m.write(i * PAGE + off, &[b]).unwrap();
                    shadow[i][off] = b;
                }
                shadow
            });
            while !started.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::yield_now();
            }
            // SAFETY: the mapping outlives its registration.
            id = Some(unsafe { engine.register(m.as_ptr(), m.len()) }.unwrap());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while engine.counters().unwrap().thp_split < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap()
        });
        converge(&engine, 2);
        let mut buf = [0u8; PAGE];
        for (i, want) in shadow.iter().enumerate() {
            m.read(i * PAGE, &mut buf).unwrap();
            assert!(buf == *want, "threshold {threshold}: page {i} lost a write");
        }
        assert!(engine.counters().unwrap().thp_split > 0);
        assert!(engine.counters().unwrap().thp_split >= 2);

        engine.unregister(id.unwrap()).unwrap();
    }
}
