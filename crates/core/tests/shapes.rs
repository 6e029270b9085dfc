//! The shapes a daemon will serve: the trees and the pool behind batched
//! traits, and the refusals the kernel makes, driven through the scanner on
//! simulated memory.

use samepage_core::model::common;
use samepage_core::pool::LocalPool;
use samepage_core::scan::DEFAULT_POOL_SLOTS;
use samepage_core::sim::{SimPage, SimPageSpace};
use samepage_core::stable::LocalStableTree;
use samepage_core::unstable::{LocalUnstableTree, RemoteHolder, UnstableOp, UnstableReply, UnstableTree};
use samepage_core::{Ksm, PageRef, RegionId, Run, TunableError, Tunables};

fn tunables(max_page_sharing: u32) -> Tunables {
    Tunables { run: Run::Merge, pages_to_scan: 1000, max_page_sharing, smart_scan: false, ..Tunables::default() }
}

/// `max_page_sharing` cannot change while stable pages exist: EBUSY, as
/// the kernel's `max_page_sharing_store` answers; it can once they are gone.
#[test]
fn max_page_sharing_is_busy_while_pages_are_shared() {
    let mut ksm = Ksm::new(tunables(256)).unwrap();
    let mut space = SimPageSpace::new();
    let id = RegionId(1);
    space.add_region(id, 8);
    ksm.add_region(id, 8);
    for i in 0..8 {
        space.write(PageRef { region: id, index: i }, 0, &common(1));
    }
    for t in 0..4 {
        ksm.scan_batch(&mut space, t);
    }
    assert_eq!(ksm.counters().pages_shared, 1);
    let err = ksm.set_tunables(tunables(16)).unwrap_err();
    assert_eq!(err, TunableError::Busy { pages_shared: 1 });
    assert_eq!(err.errno(), 16, "EBUSY");
    assert_eq!(ksm.tunables().max_page_sharing, 256, "nothing changed");
    ksm.set_tunables(tunables(256)).expect("the same value is no change");
    ksm.unmerge_all(&mut space).unwrap();
    ksm.set_tunables(tunables(16)).expect("no stable page left");
    assert_eq!(ksm.tunables().max_page_sharing, 16);
}

/// An unstable tree shared with other processes, in front of a local one:
/// contents listed in `elsewhere` are held by a page of another process.
#[derive(Default)]
struct SharedUnstable {
    local: LocalUnstableTree,
    elsewhere: Vec<u64>,
}

impl UnstableTree for SharedUnstable {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        self.local.apply(ops, out);
        for (op, r) in ops.iter().zip(out.iter_mut()) {
            if let UnstableOp::SearchInsert { key, .. } = op {
                if self.elsewhere.contains(key) {
                    self.local.apply(&[UnstableOp::Take { key: *key }], &mut Vec::new());
                    *r = UnstableReply::Elsewhere(RemoteHolder(7));
                }
            }
        }
    }
    fn clear(&mut self) {
        self.local.clear()
    }
    fn clear_and_shrink(&mut self) {
        self.local.clear_and_shrink()
    }
    fn len(&self) -> usize {
        self.local.len()
    }
    fn metadata_bytes(&self) -> u64 {
        self.local.metadata_bytes()
    }
}

/// "This page's content is also held elsewhere" is a result the scan acts
/// on: the page becomes a stable page on its own (one mapping), which the
/// other process's pages can then find in the stable tree; contents held
/// nowhere else wait in the unstable tree as before.
#[test]
fn a_content_held_elsewhere_becomes_a_stable_page_the_other_can_map() {
    let t = tunables(256);
    let shared = SharedUnstable { elsewhere: vec![samepage_core::page_hash(&common(1))], ..Default::default() };
    let mut ksm = Ksm::with_parts(
        t.clone(),
        LocalStableTree::new(t.max_page_sharing),
        shared,
        LocalPool::new(DEFAULT_POOL_SLOTS),
    )
    .unwrap();
    let mut space = SimPageSpace::new();
    let id = RegionId(1);
    space.add_region(id, 64);
    ksm.add_region(id, 64);
    space.write(PageRef { region: id, index: 0 }, 0, &common(1));
    for i in 1..64 {
        space.write(PageRef { region: id, index: i }, 0, &common(2 + i as u8));
    }
    for now in 0..4 {
        ksm.scan_batch(&mut space, now);
    }
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing, c.pages_unshared), (1, 0, 63), "{c:?}");
    assert!(matches!(space.page(PageRef { region: id, index: 0 }), SimPage::Pool(_)));
    assert_eq!(space.read(PageRef { region: id, index: 0 }), common(1), "content kept");
    ksm.check_invariants().unwrap();
}

/// Merging on request: with `run = 0`, `merge_range` merges the pages of a
/// range now (two visits: checksums, then merges) and leaves the rest alone.
#[test]
fn merge_range_merges_the_range_now_and_nothing_else() {
    let mut ksm = Ksm::new(Tunables { run: Run::Stop, ..tunables(256) }).unwrap();
    let mut space = SimPageSpace::new();
    let id = RegionId(1);
    space.add_region(id, 64);
    ksm.add_region(id, 64);
    for i in 0..64 {
        space.write(PageRef { region: id, index: i }, 0, &common(1 + (i % 4) as u8));
    }
    let r = ksm.merge_range(&mut space, id, 8..40);
    assert_eq!(r.merged, 32, "{r:?}");
    let c = ksm.counters();
    assert_eq!((c.pages_shared, c.pages_sharing), (4, 28), "{c:?}");
    for i in 0..64 {
        let merged = matches!(space.page(PageRef { region: id, index: i }), SimPage::Pool(_));
        assert_eq!(merged, (8..40).contains(&i), "page {i}");
        assert_eq!(space.read(PageRef { region: id, index: i }), common(1 + (i % 4) as u8));
    }
    ksm.check_invariants().unwrap();
    // The scan's cursor did not move: a later scan starts at the beginning.
    assert_eq!(ksm.counters().full_scans, 0);
}
