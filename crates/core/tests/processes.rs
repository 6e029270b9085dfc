//! Several simulated processes merging with each other through one shared
//! stable tree, unstable tree and pool (what `samepage daemon` serves): they
//! reach the counters one scanner over all their memory reaches (the
//! kernel's, which the single-process engine matches), every page keeps its
//! content, and a process that dies gives its mappings back without leaking
//! a pool page.

use proptest::prelude::*;
use samepage_core::model::common;
use samepage_core::rmap::Link;
use samepage_core::scan::DEFAULT_POOL_SLOTS;
use samepage_core::shared::{
    system_counters, ClientId, Shared, SharedHandle, SharedPool, SharedStableTree, SharedUnstableTree,
};
use samepage_core::sim::SimPageSpace;
use samepage_core::{Counters, Ksm, PageRef, RegionId, Run, Tunables, PAGE_SIZE};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

type Proc = Ksm<SharedStableTree, SharedUnstableTree, SharedPool>;

const PAGES: u64 = 160;

fn tunables(max_page_sharing: u32, use_zero_pages: bool) -> Tunables {
    Tunables { run: Run::Merge, pages_to_scan: 50, max_page_sharing, use_zero_pages, ..Tunables::default() }
}

/// Page `i` of process `p`: zeros, one of four contents every process
/// holds many times, a content every process holds once, or a page only this
/// process holds.
fn content(p: u32, i: u64) -> [u8; PAGE_SIZE] {
    match i % 8 {
        0 => [0; PAGE_SIZE],
        k @ 1..=4 => common(k as u8),
        // One copy in each process: only cross-process pairing merges it.
        5 => {
            let mut b = [0u8; PAGE_SIZE];
            b[..8].copy_from_slice(&i.to_le_bytes());
            b[9] = 0x5a;
            b
        }
        _ => {
            let mut b = [0u8; PAGE_SIZE];
            b[..8].copy_from_slice(&(u64::from(p) << 32 | i).to_le_bytes());
            b[8] = 0xa5;
            b
        }
    }
}

struct Machine {
    /// What each page of each process must hold.
    shadow: BTreeMap<PageRef, [u8; PAGE_SIZE]>,
    space: SimPageSpace,
    procs: Vec<Option<Proc>>,
    shared: SharedHandle,
    now: u64,
    tunables: Tunables,
}

impl Machine {
    fn new(n: u32, t: &Tunables) -> Machine {
        let mut m = Machine {
            shadow: BTreeMap::new(),
            space: SimPageSpace::new(),
            procs: Vec::new(),
            shared: Rc::new(RefCell::new(Shared::new(t.max_page_sharing, DEFAULT_POOL_SLOTS))),
            now: 0,
            tunables: t.clone(),
        };
        for p in 0..n {
            m.procs.push(None);
            m.spawn(p);
        }
        m
    }

    /// Process `p` starts (again), as a new client, with its region written.
    fn spawn(&mut self, p: u32) {
        let c = ClientId(p);
        let sh = &self.shared;
        let parts = (SharedStableTree::new(sh, c), SharedUnstableTree::new(sh, c), SharedPool::new(sh));
        let mut ksm = Ksm::with_parts(self.tunables.clone(), parts.0, parts.1, parts.2).unwrap();
        let id = region_of(p);
        self.space.add_region(id, PAGES);
        ksm.add_region(id, PAGES);
        self.procs[p as usize] = Some(ksm);
        for i in 0..PAGES {
            self.write(p, i, content(p, i));
        }
    }

    /// Process `p` writes page `i` (if it is alive).
    fn write(&mut self, p: u32, i: u64, bytes: [u8; PAGE_SIZE]) {
        if self.procs[p as usize].is_some() {
            let page = PageRef { region: region_of(p), index: i };
            self.space.write(page, 0, &bytes);
            self.shadow.insert(page, bytes);
        }
    }

    fn alive(&self) -> impl Iterator<Item = (u32, &Proc)> {
        self.procs.iter().enumerate().filter_map(|(p, k)| k.as_ref().map(|k| (p as u32, k)))
    }

    fn counters(&self) -> Counters {
        let each: Vec<Counters> = self.alive().map(|(_, k)| k.counters()).collect();
        system_counters(&each, self.shared.borrow().stats())
    }

    /// Every process scans in turn (one batch each) until the system-wide
    /// counters held still for a few rounds.
    fn converge(&mut self) -> Counters {
        let mut last = (self.counters(), 0);
        for _ in 0..2000 {
            self.now += 7;
            for k in self.procs.iter_mut().flatten() {
                k.scan_batch(&mut self.space, self.now);
            }
            let c = self.counters();
            let key = |c: &Counters| {
                (c.pages_shared, c.pages_sharing, c.ksm_zero_pages, c.stable_node_dups, c.pages_unshared)
            };
            if key(&c) == key(&last.0) {
                last.1 += 1;
                if last.1 == 20 {
                    return c;
                }
            } else {
                last = (c, 0);
            }
        }
        panic!("no convergence: {:?}", self.counters());
    }

    /// Process `p` dies: its memory goes, the shared state gives back what
    /// it held (the daemon's job), and a surviving process frees the pages
    /// of the stable pages left with no mapping at its next prune.
    fn kill(&mut self, p: u32) {
        if self.procs[p as usize].take().is_none() {
            return;
        }
        self.space.remove_region(region_of(p));
        self.shadow.retain(|page, _| page.region != region_of(p));
        self.shared.borrow_mut().client_gone(ClientId(p));
        self.now += 7;
        if let Some(k) = self.procs.iter_mut().flatten().next() {
            k.prune(&mut self.space, self.now);
            assert_eq!(self.shared.borrow().orphans(), 0, "nothing maps a dead node's page any more");
        }
    }

    /// The daemon dies and a new one starts: every process unmerges
    /// everything (its old trees answer as a dead daemon's would, forgetting
    /// what they are given back) and starts over with the new daemon's
    /// trees and pool, as `Engine`'s reconnection does. In the simulation
    /// the two daemons' pools share one slot space, so every process
    /// unmerges before any starts over (real pools are separate memfds).
    fn restart_daemon(&mut self) {
        for k in self.procs.iter_mut().flatten() {
            k.unmerge_all(&mut self.space).unwrap();
            k.set_tunables(self.tunables.clone()).unwrap();
        }
        // The old daemon's pool goes with its last holder.
        self.space.replace_pool();
        self.shared = Rc::new(RefCell::new(Shared::new(self.tunables.max_page_sharing, DEFAULT_POOL_SLOTS)));
        for (p, k) in self.procs.iter_mut().enumerate() {
            if let Some(k) = k {
                let (sh, c) = (&self.shared, ClientId(p as u32));
                let parts = (SharedStableTree::new(sh, c), SharedUnstableTree::new(sh, c), SharedPool::new(sh));
                if k.replace_parts(parts.0, parts.1, parts.2).is_err() {
                    panic!("process {p} still links to the old daemon's pool");
                }
            }
        }
    }

    /// The shared tree's mapping counts equal the pages linked to each node
    /// over all live processes and the pages mapping each slot; no pool page
    /// is left without a node; every page holds what its process wrote.
    fn check(&self, exact: bool) {
        let mut linked: BTreeMap<_, u32> = BTreeMap::new();
        for (p, k) in self.alive() {
            k.check_invariants().unwrap_or_else(|e| panic!("process {p}: {e}"));
            for i in 0..PAGES {
                let page = PageRef { region: region_of(p), index: i };
                if let Link::Stable(n) = k.item(page).link() {
                    *linked.entry(n).or_default() += 1;
                }
                assert!(self.space.read(page) == self.shadow[&page], "process {p} page {i} lost its content");
            }
        }
        let nodes = self.shared.borrow().all_nodes();
        let maps = self.space.slot_mappings();
        for n in &nodes {
            assert_eq!(linked.remove(&n.id).unwrap_or(0), n.mappings, "node {n:?}");
            // A page written since its merge maps a private copy until its
            // scanner's next visit sees it: fewer pages may map the slot.
            let mapping = maps.get(&n.slot).copied().unwrap_or(0);
            assert!(mapping <= u64::from(n.mappings), "slot of {n:?} mapped {mapping} times");
            if exact {
                assert_eq!(mapping, u64::from(n.mappings), "slot of {n:?}");
            }
        }
        assert!(linked.is_empty(), "pages link dead nodes: {linked:?}");
        // A page maps only the slot of a live node: a pool page is freed
        // when its node dies, whoever maps it.
        let live: std::collections::BTreeSet<_> = nodes.iter().map(|n| n.slot).collect();
        for slot in maps.keys() {
            assert!(live.contains(slot), "{slot:?} mapped without a node: {:?}", maps[slot]);
        }
        let orphans = self.shared.borrow().orphans();
        assert_eq!(self.space.pool_pages(), nodes.len() + orphans, "pool pages without a node");
        assert!(self.space.pool_unchanged());
    }
}

fn region_of(p: u32) -> RegionId {
    RegionId(p + 1)
}

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

/// What happens on the machine: a process writes a page (one of a few
/// contents, so pages keep merging and unmerging), every process scans,
/// a process is killed, a killed process starts again.
#[derive(Clone, Debug)]
enum Step {
    Write { p: u32, i: u64, which: u8 },
    Scan { batches: u8 },
    Kill { p: u32 },
    Spawn { p: u32 },
    RestartDaemon,
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
            match s {
                Step::Write { p, i, which } => m.write(p, i, if which < 5 { common(which) } else { content(p, i) }),
                Step::Scan { batches } => {
                    for _ in 0..batches {
                        m.now += 7;
                        for k in m.procs.iter_mut().flatten() {
                            k.scan_batch(&mut m.space, m.now);
                        }
                    }
                }
                Step::Kill { p } => m.kill(p),
                Step::Spawn { p } => {
                    if m.procs[p as usize].is_none() {
                        m.spawn(p);
                    }
                }
                Step::RestartDaemon => m.restart_daemon(),
            }
            m.check(false);
        }
    }
}
