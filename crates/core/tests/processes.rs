//! Several simulated processes merging with each other through one shared
//! stable tree, unstable tree and pool (what `samepage daemon` serves): they
//! reach the counters one scanner over all their memory reaches (the
//! kernel's, which the single-process engine matches), every page keeps its
//! content, and a process that dies gives its mappings back without leaking
//! a pool page.

use proptest::prelude::*;
use samepage_core::machine::{content, region_of, tunables, Machine, Step, PAGES};
use samepage_core::rmap::Link;
use samepage_core::sim::SimPageSpace;
use samepage_core::{Counters, Ksm, PageRef, Tunables};

/// One scanner over the same memory in one process (the reference: its
/// counters equal ksmd's on the same content).
fn one_process(n: u32, t: &Tunables) -> Counters {
    let mut ksm = Ksm::new(t.clone()).unwrap();
    let mut space = SimPageSpace::new();
    for p in 0..n {
        let id = region_of(p);
        space.add_region(id, PAGES);
        ksm.add_region(id, PAGES);
        for i in 0..PAGES {
            space.write(PageRef { region: id, index: i }, 0, &content(p, i));
        }
    }
    for now in 0..2000 {
        ksm.scan_batch(&mut space, now * 7);
    }
    ksm.check_invariants().unwrap();
    ksm.counters()
}

fn kernel_view(c: &Counters) -> [u64; 5] {
    [c.pages_shared, c.pages_sharing, c.stable_node_chains, c.stable_node_dups, c.ksm_zero_pages]
}

#[test]
fn processes_reach_the_counters_of_one_scanner_over_all_their_memory() {
    for (max, zero) in [(256, false), (256, true), (4, false), (3, true), (2, false)] {
        let t = tunables(max, zero);
        let mut m = Machine::new(4, &t);
        let c = m.converge();
        m.check(true);
        let want = one_process(4, &t);
        assert_eq!(kernel_view(&c), kernel_view(&want), "max_page_sharing {max}, use_zero_pages {zero}: {c:?}");
        assert!(c.pages_sharing > 0);
        // Each process maps stable pages made by the others.
        for (p, k) in m.alive() {
            let made_elsewhere = (0..PAGES)
                .filter(|&i| matches!(k.item(PageRef { region: region_of(p), index: i }).link(), Link::Stable(_)))
                .count();
            assert!(made_elsewhere > 0, "process {p} merged nothing");
        }
    }
}

#[test]
fn a_process_that_dies_gives_its_mappings_back_and_leaks_no_pool_page() {
    let t = tunables(4, false);
    let mut m = Machine::new(4, &t);
    m.converge();
    m.check(true);
    let pool_before = m.space.pool_pages();
    m.kill(2);
    m.check(true);
    m.converge();
    m.check(true);
    assert!(m.space.pool_pages() < pool_before, "the dead process's dups went");
    // The others keep merging; with every process gone, nothing is left.
    for p in [0, 1, 3] {
        let ksm = m.procs[p as usize].as_mut().unwrap();
        ksm.remove_region(&mut m.space, region_of(p)).unwrap();
        m.space.remove_region(region_of(p));
        m.procs[p as usize] = None;
    }
    assert_eq!(m.space.pool_pages(), 0, "pool pages left: {:?}", m.shared.borrow().all_nodes());
    assert_eq!(m.shared.borrow().pool_in_use(), 0);
    assert!(m.space.slot_mappings().is_empty());
}

/// A daemon restart: the processes start over with the new daemon and
/// reach the counters they had, every byte intact, no pool page left over.
#[test]
fn a_daemon_restart_starts_every_process_over_and_reaches_the_same_counters() {
    let t = tunables(4, true);
    let mut m = Machine::new(4, &t);
    let before = m.converge();
    m.check(true);
    m.restart_daemon();
    m.check(true);
    let after = m.converge();
    m.check(true);
    assert_eq!(kernel_view(&after), kernel_view(&before));
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..3u32, 0..PAGES, 0..6u8).prop_map(|(p, i, which)| Step::Write { p, i, which }),
        6 => (1..8u8).prop_map(|batches| Step::Scan { batches }),
        1 => (0..3u32).prop_map(|p| Step::Kill { p }),
        1 => (0..3u32).prop_map(|p| Step::Spawn { p }),
        1 => Just(Step::RestartDaemon),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the processes write, however they die and start again, every
    /// page holds what its process wrote, the shared tree's counts equal the
    /// pages linked to each node and mapping each slot, and no pool page is
    /// left without a node.
    #[test]
    fn processes_sharing_a_tree_never_lose_a_write_or_a_pool_page(
        steps in prop::collection::vec(step(), 1..60),
        max_page_sharing in 2u32..6,
        use_zero_pages in any::<bool>(),
        map_budget in prop::option::of(0u64..400),
    ) {
        let mut t = tunables(max_page_sharing, use_zero_pages);
        t.pages_to_scan = 37;
        let mut m = Machine::new(3, &t);
        m.space.map_budget = map_budget;
        for s in steps {
            m.apply(&s);
            m.check(false);
        }
    }
}
