//! Several simulated processes merging with each other through one shared
//! stable tree, unstable tree and pool (what `samepage daemon` serves), on
//! one simulated page space: processes write, scan, die, start again, and
//! the daemon itself dies and starts again. [`Machine::check`] holds after
//! every step: every page holds what its process wrote, the shared tree's
//! counts equal the pages linked to each node and mapping each slot, and no
//! pool page is left without a node. The processes property test and the
//! `processes` fuzz target drive it.

use crate::model::common;
use crate::rmap::Link;
use crate::scan::DEFAULT_POOL_SLOTS;
use crate::shared::{
    system_counters, ClientId, Shared, SharedHandle, SharedPool, SharedStableTree, SharedUnstableTree,
};
use crate::sim::SimPageSpace;
use crate::{Counters, Ksm, PageRef, RegionId, Run, Tunables, PAGE_SIZE};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// A process's scanner, its trees and pool the shared ones.
pub type Proc = Ksm<SharedStableTree, SharedUnstableTree, SharedPool>;

/// Pages each process registers.
pub const PAGES: u64 = 160;

/// Tunables for the machine: merging, 50 pages a batch.
pub fn tunables(max_page_sharing: u32, use_zero_pages: bool) -> Tunables {
    Tunables { run: Run::Merge, pages_to_scan: 50, max_page_sharing, use_zero_pages, ..Tunables::default() }
}

/// Page `i` of process `p`: zeros, one of four contents every process
/// holds many times, a content every process holds once, or a page only this
/// process holds.
pub fn content(p: u32, i: u64) -> [u8; PAGE_SIZE] {
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

/// The processes, their memory and the daemon's shared state.
pub struct Machine {
    /// What each page of each process must hold.
    shadow: BTreeMap<PageRef, [u8; PAGE_SIZE]>,
    /// The memory of every process.
    pub space: SimPageSpace,
    /// Each process's scanner (`None`: not running).
    pub procs: Vec<Option<Proc>>,
    /// The daemon's state.
    pub shared: SharedHandle,
    /// The clock, in ms.
    pub now: u64,
    tunables: Tunables,
}

impl Machine {
    /// `n` processes with their regions written.
    pub fn new(n: u32, t: &Tunables) -> Machine {
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
    pub fn spawn(&mut self, p: u32) {
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
    pub fn write(&mut self, p: u32, i: u64, bytes: [u8; PAGE_SIZE]) {
        if self.procs[p as usize].is_some() {
            let page = PageRef { region: region_of(p), index: i };
            self.space.write(page, 0, &bytes);
            self.shadow.insert(page, bytes);
        }
    }

    /// The running processes and their scanners.
    pub fn alive(&self) -> impl Iterator<Item = (u32, &Proc)> {
        self.procs.iter().enumerate().filter_map(|(p, k)| k.as_ref().map(|k| (p as u32, k)))
    }

    /// The system-wide counters: the processes' own, with the daemon's
    /// stable tree.
    pub fn counters(&self) -> Counters {
        let each: Vec<Counters> = self.alive().map(|(_, k)| k.counters()).collect();
        system_counters(&each, self.shared.borrow().stats())
    }

    /// Every running process scans one batch, 7 ms later.
    pub fn scan_round(&mut self) {
        self.now += 7;
        for k in self.procs.iter_mut().flatten() {
            k.scan_batch(&mut self.space, self.now);
        }
    }

    /// Every process scans in turn (one batch each) until the system-wide
    /// counters held still for a few rounds.
    pub fn converge(&mut self) -> Counters {
        let mut last = (self.counters(), 0);
        for _ in 0..2000 {
            self.scan_round();
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
    pub fn kill(&mut self, p: u32) {
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
    pub fn restart_daemon(&mut self) {
        for k in self.procs.iter_mut().flatten() {
            k.unmerge_all(&mut self.space).unwrap();
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
    pub fn check(&self, exact: bool) {
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

/// Process `p`'s region.
pub fn region_of(p: u32) -> RegionId {
    RegionId(p + 1)
}

/// What happens on the machine: a process writes a page (one of a few
/// contents, so pages keep merging and unmerging), every process scans,
/// a process is killed, a killed process starts again.
#[derive(Clone, Debug)]
pub enum Step {
    /// Process `p` writes page `i`: common content `which` (below 5), else its own.
    #[allow(missing_docs, reason = "the variant says what they are")]
    Write { p: u32, i: u64, which: u8 },
    /// Every process scans `batches` batches.
    #[allow(missing_docs, reason = "the variant says what it is")]
    Scan { batches: u8 },
    /// Process `p` is killed.
    #[allow(missing_docs, reason = "the variant says what it is")]
    Kill { p: u32 },
    /// Process `p` starts again (if it is not running).
    #[allow(missing_docs, reason = "the variant says what it is")]
    Spawn { p: u32 },
    /// The daemon dies and a new one starts.
    RestartDaemon,
}

impl Step {
    /// A step from 4 fuzzer bytes, for 3 processes (weights as the
    /// property test's: writes and scans common, deaths and restarts rare).
    pub fn from_bytes(b: [u8; 4]) -> Step {
        let p = u32::from(b[1] % 3);
        match b[0] % 16 {
            0..=5 => Step::Write { p, i: u64::from(u16::from_le_bytes([b[2], b[3]])) % PAGES, which: b[3] % 6 },
            6..=11 => Step::Scan { batches: b[2] % 7 + 1 },
            12 => Step::Kill { p },
            13 | 14 => Step::Spawn { p },
            _ => Step::RestartDaemon,
        }
    }
}

impl Machine {
    /// Carries out `step`.
    pub fn apply(&mut self, step: &Step) {
        match *step {
            Step::Write { p, i, which } => self.write(p, i, if which < 5 { common(which) } else { content(p, i) }),
            Step::Scan { batches } => (0..batches).for_each(|_| self.scan_round()),
            Step::Kill { p } => self.kill(p),
            Step::Spawn { p } => {
                if self.procs[p as usize].is_none() {
                    self.spawn(p);
                }
            }
            Step::RestartDaemon => self.restart_daemon(),
        }
    }
}
