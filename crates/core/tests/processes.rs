//! Several simulated processes merging with each other through one shared
//! stable tree, unstable tree and pool (what `samepage daemon` serves): they
//! reach the counters one scanner over all their memory reaches (the
//! kernel's, which the single-process engine matches), every page keeps its
//! content, and a process that dies gives its mappings back without leaking
//! a pool page.

use samepage_core::model::common;
use samepage_core::page::page_hash;
use samepage_core::pool::StablePool;
use samepage_core::rmap::Link;
use samepage_core::scan::DEFAULT_POOL_SLOTS;
use samepage_core::shared::{system_counters, ClientId, SharedPool, SharedStableTree, SharedUnstableTree};
use samepage_core::sim::SimPageSpace;
use samepage_core::space::{PageSpace, SlotRelease};
use samepage_core::{Counters, Ksm, PageRef, RegionId, Run, Tunables, PAGE_SIZE};
use std::collections::BTreeMap;

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
    space: SimPageSpace,
    procs: Vec<Option<Proc>>,
    stable: SharedStableTree,
    unstable: SharedUnstableTree,
    pool: SharedPool,
    now: u64,
}

impl Machine {
    fn new(n: u32, t: &Tunables) -> Machine {
        let stable = SharedStableTree::new(t.max_page_sharing);
        let unstable = SharedUnstableTree::new();
        let pool = SharedPool::new(DEFAULT_POOL_SLOTS);
        let mut space = SimPageSpace::new();
        let mut procs = Vec::new();
        for p in 0..n {
            let c = ClientId(p);
            let mut ksm = Ksm::with_parts(t.clone(), stable.client(c), unstable.client(c), pool.clone()).unwrap();
            let id = region_of(p);
            space.add_region(id, PAGES);
            ksm.add_region(id, PAGES);
            for i in 0..PAGES {
                space.write(PageRef { region: id, index: i }, 0, &content(p, i));
            }
            procs.push(Some(ksm));
        }
        Machine { space, procs, stable, unstable, pool, now: 0 }
    }

    fn alive(&self) -> impl Iterator<Item = (u32, &Proc)> {
        self.procs.iter().enumerate().filter_map(|(p, k)| k.as_ref().map(|k| (p as u32, k)))
    }

    fn counters(&self) -> Counters {
        let each: Vec<Counters> = self.alive().map(|(_, k)| k.counters()).collect();
        system_counters(&each, samepage_core::stable::StableTree::stats(&self.stable))
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
    /// it held (the daemon's job), and the freed slots' pages are freed.
    fn kill(&mut self, p: u32) {
        self.procs[p as usize] = None;
        self.space.remove_region(region_of(p));
        let freed = self.stable.client(ClientId(p)).client_gone();
        self.unstable.client(ClientId(p)).client_gone();
        let mut out = Vec::new();
        self.space.release_slots(&freed, &mut out);
        let gone: Vec<_> = freed.iter().zip(&out).filter(|(_, r)| **r == SlotRelease::Freed).map(|(s, _)| *s).collect();
        assert_eq!(gone.len(), freed.len(), "nothing else maps a dead node's page: {out:?}");
        self.pool.free(&gone);
    }

    /// The shared tree's mapping counts equal the pages linked to each node
    /// over all live processes and the pages mapping each slot; no pool page
    /// is left without a node; every page holds what its process wrote.
    fn check(&self) {
        let mut linked: BTreeMap<_, u32> = BTreeMap::new();
        for (p, k) in self.alive() {
            k.check_invariants().unwrap_or_else(|e| panic!("process {p}: {e}"));
            for i in 0..PAGES {
                let page = PageRef { region: region_of(p), index: i };
                if let Link::Stable(n) = k.item(page).link() {
                    *linked.entry(n).or_default() += 1;
                }
                assert_eq!(page_hash(&self.space.read(page)), page_hash(&content(p, i)), "process {p} page {i}");
            }
        }
        let nodes = self.stable.all_nodes();
        let maps = self.space.slot_mappings();
        for n in &nodes {
            assert_eq!(linked.remove(&n.id).unwrap_or(0), n.mappings, "node {n:?}");
            assert_eq!(maps.get(&n.slot).copied().unwrap_or(0), u64::from(n.mappings), "slot of {n:?}");
        }
        assert!(linked.is_empty(), "pages link dead nodes: {linked:?}");
        assert_eq!(self.space.pool_pages(), nodes.len(), "pool pages without a node");
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
        m.check();
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
    m.check();
    let pool_before = m.space.pool_pages();
    m.kill(2);
    m.check();
    m.converge();
    m.check();
    assert!(m.space.pool_pages() < pool_before, "the dead process's dups went");
    // The others keep merging; with every process gone, nothing is left.
    for p in [0, 1, 3] {
        let ksm = m.procs[p as usize].as_mut().unwrap();
        ksm.remove_region(&mut m.space, region_of(p)).unwrap();
        m.space.remove_region(region_of(p));
        m.procs[p as usize] = None;
    }
    assert_eq!(m.space.pool_pages(), 0, "pool pages left: {:?}", m.stable.all_nodes());
    assert_eq!(m.pool.in_use(), 0);
    assert!(m.space.slot_mappings().is_empty());
}
