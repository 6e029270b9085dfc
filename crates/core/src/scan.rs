//! The scanner: the kernel's `ksm_do_scan` and `cmp_and_merge_page`.
//!
//! Each call of [`Ksm::scan_batch`] visits up to `pages_to_scan` present pages
//! from the cursor on (the kernel's `ksm_scan`), region after region. For each
//! page, in this order:
//!
//! 1. a page still mapping its stable page (or its engine-placed zero page)
//!    costs nothing: the page space says so without reading it;
//! 2. with `use_zero_pages`, an empty page whose checksum held still since the
//!    previous visit is merged with the kernel's zero page, with no rmap item;
//! 3. the stable tree is searched: a match merges the page into the busiest
//!    stable page that has fewer than `max_page_sharing` mappings;
//! 4. a page whose checksum changed since the previous visit is *volatile*:
//!    its new checksum is kept and it goes no further;
//! 5. the unstable tree is searched: a match makes both pages one new stable
//!    page (a fresh pool slot, filled from one of them), and no match files the
//!    page there until the end of the full scan.
//!
//! Merges are collected as [`Intent`]s and carried out once per batch by
//! [`PageSpace::merge`], so runs of pages become one mapping; the decisions
//! are recorded first and undone for any merge the page space reports failed.

use crate::advisor::{scan_time_advisor, AdvisorCtx};
use crate::counters::{Counters, RegionCounters};
use crate::page::{checksum_of, zero_page_hash, Domain, PageRef, RegionId, Slot};
use crate::pool::{LocalPool, StablePool};
use crate::rmap::{Link, RmapItem, RmapTable};
use crate::space::{Discard, Intent, IntentResult, PageSpace, PageState, Sample, SlotRelease, SpaceError, Target};
use crate::stable::{LocalStableIndex, NodeId, StableIndex, StableNode};
use crate::tunables::{AdvisorMode, Run, TunableError, Tunables};
use crate::unstable::UnstableIndex;
use std::collections::{BTreeMap, HashMap};
use std::ops::{Bound, Range};

/// Pages sampled, and merges collected, before they are processed.
const SAMPLE_CHUNK: usize = 2048;

/// Slots a [`LocalPool`] made by [`Ksm::new`] holds: 2^28 pages (1 TiB).
pub const DEFAULT_POOL_SLOTS: u64 = 1 << 28;

#[derive(Debug)]
struct RegionState {
    rmap: RmapTable,
    counts: RegionCounters,
    domain: Domain,
    /// Page ranges the program took back ([`Ksm::release_range`]), sorted and
    /// disjoint: never sampled again.
    released: Vec<Range<u64>>,
}

impl RegionState {
    /// Where sampling from `start` may go: `(from, to)` with `from` past any
    /// released range holding `start`, `to` the next released range's start.
    fn walkable(&self, start: u64) -> (u64, u64) {
        let mut from = start;
        for r in &self.released {
            if r.contains(&from) {
                from = r.end;
            } else if r.start > from {
                return (from, r.start);
            }
        }
        (from, self.rmap.npages())
    }
}

/// Subpages of a transparent huge page.
const HUGE_SUBPAGES: u64 = 512;

/// A huge page kept whole below `thp_split_min_subpages`.
#[derive(Clone, Copy, Debug)]
struct ThpMemo {
    /// Subpages that would merge.
    would: u32,
    /// Times it was kept whole in a row (for the back-off).
    age: u8,
    /// Visits still to skip.
    skip: u8,
    /// The full scan it was last met in.
    seen: u64,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    node: Option<NodeId>,
    /// For a refile (defragmentation): the dup the page maps now.
    refile_from: Option<NodeId>,
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Present pages visited.
    pub pages_scanned: u64,
    /// Whether a full scan ended in this batch.
    pub full_scan_ended: bool,
    /// Merges carried out.
    pub merged: u64,
}

/// The scanner and its trees. Generic over the stable tree and the pool so a
/// shared (multi-process) implementation can be dropped in.
#[derive(Debug)]
pub struct Ksm<I: StableIndex = LocalStableIndex, P: StablePool = LocalPool> {
    tunables: Tunables,
    regions: BTreeMap<RegionId, RegionState>,
    cursor: Option<(RegionId, u64)>,
    stable: I,
    unstable: UnstableIndex,
    pool: P,
    c: Counters,
    /// Sum of `rmap_hlist_len` over stable nodes.
    mappings: u64,
    /// Nodes with at least one mapping.
    live_nodes: u64,
    /// Slots whose node died; freed at the end of the batch or, if something
    /// still maps them, at a later prune.
    dead_slots: Vec<Slot>,
    deferred_slots: Vec<Slot>,
    last_prune_ms: u64,
    samples: Vec<Sample>,
    intents: Vec<Intent>,
    pending: Vec<Pending>,
    results: Vec<IntentResult>,
    last_new_slot: Option<(PageRef, Slot)>,
    advisor: AdvisorCtx,
    more_samples: Vec<Sample>,
    thp_memo: HashMap<(RegionId, u64), ThpMemo>,
    /// The huge page being visited: region, subpages, key.
    in_huge: Option<(RegionId, std::ops::RangeInclusive<u64>, u64)>,
    /// Its subpages that would merge with a subpage of another huge page not
    /// split (a pairing held back).
    huge_blocked: u32,
    /// Unstable-tree entries filed from huge pages, with their huge page's
    /// key: pairing with one of a huge page not split (not in `split_frames`)
    /// would split it, so below `thp_split_min_subpages` it counts but does
    /// not pair.
    unstable_huge: HashMap<u64, u64>,
    /// Huge pages split in this full scan.
    split_frames: std::collections::HashSet<(RegionId, u64)>,
    /// The full scan in which the page space refused a merge for its VMA
    /// budget: no more merges that need a mapping are tried in it.
    over_budget_scan: Option<u64>,
}

impl Ksm<LocalStableIndex, LocalPool> {
    /// A scanner with the in-process stable tree and pool.
    pub fn new(tunables: Tunables) -> Result<Self, TunableError> {
        Self::with_parts(tunables, LocalStableIndex::new(), LocalPool::new(DEFAULT_POOL_SLOTS))
    }
}

impl<I: StableIndex, P: StablePool> Ksm<I, P> {
    /// A scanner over a given stable tree and pool.
    pub fn with_parts(tunables: Tunables, stable: I, pool: P) -> Result<Self, TunableError> {
        tunables.validate()?;
        Ok(Ksm {
            tunables,
            regions: BTreeMap::new(),
            cursor: None,
            stable,
            unstable: UnstableIndex::new(),
            pool,
            c: Counters::default(),
            mappings: 0,
            live_nodes: 0,
            dead_slots: Vec::new(),
            deferred_slots: Vec::new(),
            last_prune_ms: 0,
            samples: Vec::new(),
            intents: Vec::new(),
            pending: Vec::new(),
            results: Vec::new(),
            last_new_slot: None,
            advisor: AdvisorCtx::default(),
            more_samples: Vec::new(),
            thp_memo: HashMap::new(),
            in_huge: None,
            huge_blocked: 0,
            unstable_huge: HashMap::new(),
            split_frames: std::collections::HashSet::new(),
            over_budget_scan: None,
        })
    }

    /// The tunables in force.
    pub fn tunables(&self) -> &Tunables {
        &self.tunables
    }

    /// Replaces the tunables. Validated as the kernel does; changing
    /// `max_page_sharing` while stable pages exist is refused with
    /// [`TunableError::Busy`], as the kernel's EBUSY. Switching `run` to
    /// [`Run::Unmerge`] here only records it: the caller unmerges with
    /// [`Ksm::unmerge_all`].
    pub fn set_tunables(&mut self, mut t: Tunables) -> Result<(), TunableError> {
        t.validate()?;
        if t.max_page_sharing != self.tunables.max_page_sharing && self.live_nodes > 0 {
            return Err(TunableError::Busy { pages_shared: self.live_nodes });
        }
        if t.advisor_mode != self.tunables.advisor_mode {
            // The kernel's set_advisor_defaults().
            self.advisor = AdvisorCtx::default();
            t.pages_to_scan = match t.advisor_mode {
                AdvisorMode::None => 100,
                AdvisorMode::ScanTime => t.advisor_min_pages_to_scan,
            };
        } else if t.advisor_mode != AdvisorMode::None && t.pages_to_scan != self.tunables.pages_to_scan {
            return Err(TunableError::Refused {
                name: "pages_to_scan",
                why: "advisor_mode is scan-time: the advisor sets it (set advisor_mode=none first)",
            });
        }
        self.tunables = t;
        Ok(())
    }

    /// Registers a region of `npages` pages (the `MADV_MERGEABLE` step).
    /// The caller registers it with the page space first.
    pub fn add_region(&mut self, id: RegionId, npages: u64) {
        self.add_region_in(id, npages, Domain::default());
    }

    /// Registers a region in a trust domain: its pages merge only with pages
    /// of the same domain (zero pages excepted: the kernel's zero page holds
    /// no one's data).
    pub fn add_region_in(&mut self, id: RegionId, npages: u64, domain: Domain) {
        self.regions.insert(
            id,
            RegionState {
                rmap: RmapTable::new(npages),
                counts: RegionCounters::default(),
                domain,
                released: Vec::new(),
            },
        );
    }

    fn domain(&self, r: RegionId) -> Option<Domain> {
        self.regions.get(&r).map(|s| s.domain)
    }

    /// The regions registered, in scan order.
    pub fn region_ids(&self) -> Vec<RegionId> {
        self.regions.keys().copied().collect()
    }

    /// Unregisters a region (`MADV_UNMERGEABLE` then forget): every merged
    /// page, zero pages included, is made private again with its content
    /// intact. On an error (for example too little free memory to unshare)
    /// the region stays registered and nothing is lost.
    pub fn remove_region(&mut self, space: &mut impl PageSpace, id: RegionId) -> Result<(), SpaceError> {
        self.unmerge_region(space, id, 0..u64::MAX)?;
        self.thp_memo.retain(|k, _| k.0 != id);
        let state = self.regions.remove(&id).expect("unmerged above");
        for (index, _) in state.rmap.linked_in(0, state.rmap.npages()) {
            // Only Seen/Unstable remain after the unmerge.
            let item = state.rmap.get(index);
            self.count_link(item.link(), -1);
        }
        if matches!(self.cursor, Some((r, _)) if r == id) {
            self.cursor = self.next_region_after(id).map(|r| (r, 0));
        }
        self.free_dead_slots(space);
        if self.regions.is_empty() {
            self.release_memory();
        }
        Ok(())
    }

    /// With no region left, the indexes and buffers give their memory back
    /// (what is left is what a fresh engine holds, plus slots a forked child
    /// still maps).
    fn release_memory(&mut self) {
        self.stable.shrink();
        self.unstable.clear_and_shrink();
        self.unstable_huge = HashMap::new();
        self.split_frames = Default::default();
        self.thp_memo = HashMap::new();
        self.samples = Vec::new();
        self.more_samples = Vec::new();
        self.intents = Vec::new();
        self.pending = Vec::new();
        self.results = Vec::new();
        self.dead_slots.shrink_to_fit();
        self.deferred_slots.shrink_to_fit();
    }

    /// `run = 2`: unmerges every region, keeping them registered, and drops
    /// the unstable tree. Stops at the first error, with nothing lost, and
    /// leaves `run = 0`, as the kernel's `run_store` does.
    pub fn unmerge_all(&mut self, space: &mut impl PageSpace) -> Result<(), SpaceError> {
        for id in self.region_ids() {
            if let Err(e) = self.unmerge_region(space, id, 0..u64::MAX) {
                self.tunables.run = Run::Stop;
                return Err(e);
            }
        }
        self.clear_unstable();
        self.free_dead_slots(space);
        Ok(())
    }

    /// Throws the unstable tree away (keeping its allocation), with its
    /// record of entries filed from huge pages.
    fn clear_unstable(&mut self) {
        self.unstable.clear();
        self.unstable_huge.clear();
    }

    /// The program takes pages `range` of region `id` back, to `munmap`,
    /// `mremap` or `mprotect` them (`MADV_UNMERGEABLE` on part of a region,
    /// then forget it): the merged pages there become private with their
    /// content intact, their rmap items go, and the scanner never visits the
    /// range again. On an error (too little memory to unshare) nothing is
    /// lost and nothing is released. `range` is clipped to the region.
    pub fn release_range(
        &mut self,
        space: &mut impl PageSpace,
        id: RegionId,
        range: Range<u64>,
    ) -> Result<(), SpaceError> {
        let npages = self.regions.get(&id).ok_or(SpaceError::UnknownRegion(id))?.rmap.npages();
        let range = range.start.min(npages)..range.end.min(npages);
        if range.is_empty() {
            return Ok(());
        }
        self.unmerge_region(space, id, range.clone())?;
        let state = &self.regions[&id];
        let linked: Vec<u64> = state.rmap.linked_in(range.start, range.end).map(|(i, _)| i).collect();
        for index in linked {
            // Seen or Unstable: an unstable-tree entry of the page is stale from now on.
            self.relink(PageRef { region: id, index }, RmapItem::default());
        }
        space.release_range(id, range.clone());
        self.thp_memo.retain(|k, _| k.0 != id);
        let state = self.regions.get_mut(&id).expect("checked above");
        state.released.push(range);
        state.released.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(state.released.len());
        for r in state.released.drain(..) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        state.released = merged;
        self.free_dead_slots(space);
        Ok(())
    }

    /// Drops the links of pages the page space saw the program discard
    /// ([`PageSpace::drain_discarded`]): they read zeros now.
    fn forget_discarded(&mut self, space: &mut impl PageSpace) {
        let mut pages = Vec::new();
        space.drain_discarded(&mut pages);
        for page in pages {
            // Only merged pages: a zero page stays one when discarded.
            if let Link::Stable(n) = self.item(page).link() {
                self.node_dec(n);
                self.relink(page, RmapItem::default());
            }
        }
        self.free_dead_slots(space);
    }

    /// The program discards pages `range` of region `id` (`MADV_DONTNEED`,
    /// `MADV_FREE`, `MADV_REMOVE`): the page space makes them read as zeros
    /// (pages mapping the pool included, which the kernel's `MADV_DONTNEED`
    /// would bring back with their merged content), and their rmap items go,
    /// as the kernel's go once its cursor finds the pages gone. The range
    /// stays registered. On an error nothing changed. `range` is clipped to
    /// the region.
    pub fn discard_range(
        &mut self,
        space: &mut impl PageSpace,
        id: RegionId,
        range: Range<u64>,
        how: Discard,
    ) -> Result<(), SpaceError> {
        let state = self.regions.get(&id).ok_or(SpaceError::UnknownRegion(id))?;
        let npages = state.rmap.npages();
        let range = range.start.min(npages)..range.end.min(npages);
        if range.is_empty() {
            return Ok(());
        }
        space.discard(id, range.clone(), how)?;
        let state = &self.regions[&id];
        let linked: Vec<(u64, RmapItem)> = state.rmap.linked_in(range.start, range.end).collect();
        for (index, item) in linked {
            if let Link::Stable(n) = item.link() {
                self.node_dec(n);
            }
            self.relink(PageRef { region: id, index }, RmapItem::default());
        }
        self.free_dead_slots(space);
        Ok(())
    }

    /// The ranges of region `id` released so far, sorted and disjoint.
    pub fn released_ranges(&self, id: RegionId) -> Option<&[Range<u64>]> {
        self.regions.get(&id).map(|r| &r.released[..])
    }

    /// Makes the merged pages of `range` of region `id` private again (the
    /// kernel's `MADV_UNMERGEABLE`) while the region stays registered: for a
    /// range the engine must stay away from from now on. `range` is clipped
    /// to the region.
    pub fn unmerge_range(
        &mut self,
        space: &mut impl PageSpace,
        id: RegionId,
        range: Range<u64>,
    ) -> Result<(), SpaceError> {
        self.unmerge_region(space, id, range)?;
        self.free_dead_slots(space);
        Ok(())
    }

    fn unmerge_region(
        &mut self,
        space: &mut impl PageSpace,
        id: RegionId,
        range: Range<u64>,
    ) -> Result<(), SpaceError> {
        let state = self.regions.get(&id).ok_or(SpaceError::UnknownRegion(id))?;
        let range = range.start.min(state.rmap.npages())..range.end.min(state.rmap.npages());
        let merged: Vec<u64> = state
            .rmap
            .linked_in(range.start, range.end)
            .filter(|(_, it)| matches!(it.link(), Link::Stable(_) | Link::Zero))
            .map(|(i, _)| i)
            .collect();
        // Called even with nothing merged: pages copied inside a pool mapping
        // since their merge leave it too.
        space.unmerge(id, range, &merged)?;
        self.c.unmerges += merged.len() as u64;
        for index in merged {
            let page = PageRef { region: id, index };
            let item = self.item(page);
            if let Link::Stable(n) = item.link() {
                self.node_dec(n);
            }
            self.relink(page, RmapItem::new(item.oldchecksum, Link::Seen));
        }
        Ok(())
    }

    /// Counters, with the kernel's names and meanings.
    pub fn counters(&self) -> Counters {
        let mut c = self.c.clone();
        c.pages_shared = self.live_nodes;
        c.pages_sharing = self.mappings - self.live_nodes;
        c.pages_volatile = c.rmap_items.saturating_sub(self.mappings + c.pages_unshared);
        let (chains, dups) = self.stable.chain_counts();
        c.stable_node_chains = chains;
        c.stable_node_dups = dups;
        c.metadata_bytes = self.metadata_bytes();
        c.general_profit = (c.pages_saved() * crate::PAGE_SIZE as u64) as i64 - c.metadata_bytes as i64;
        c.pool_slots_pending = self.deferred_slots.len() as u64;
        c.thp_kept_whole = self.thp_memo.len() as u64;
        c.thp_left_subpages = self.thp_memo.values().map(|m| m.would as u64).sum();
        c
    }

    /// The fewest stable pages the current mappings need:
    /// `ceil(mappings / max_page_sharing)` per content (what defragmentation
    /// brings `pages_shared` down to).
    pub fn stable_pages_needed(&self) -> u64 {
        let mut per_content: std::collections::HashMap<(u64, Domain), u64> = std::collections::HashMap::new();
        for id in self.stable.ids() {
            let n = self.stable.node(id);
            *per_content.entry((n.hash, n.domain)).or_default() += n.rmap_hlist_len as u64;
        }
        per_content.values().map(|m| m.div_ceil(self.tunables.max_page_sharing as u64)).sum()
    }

    /// Per-region counters, as `/proc/PID/ksm_stat` names them.
    pub fn region_counters(&self, id: RegionId) -> Option<RegionCounters> {
        let r = self.regions.get(&id)?;
        Some(r.counts.clone().with_profit(r.rmap.metadata_bytes()))
    }

    /// Bytes of metadata: rmap tables, stable and unstable trees, pool bookkeeping.
    pub fn metadata_bytes(&self) -> u64 {
        self.regions.values().map(|r| r.rmap.metadata_bytes()).sum::<u64>()
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()
            + self.pool.metadata_bytes()
            + ((self.samples.capacity() * std::mem::size_of::<Sample>())
                + self.intents.capacity() * std::mem::size_of::<Intent>()
                + self.pending.capacity() * std::mem::size_of::<Pending>()
                + self.results.capacity()) as u64
    }

    /// The rmap item of a page (empty where none exists).
    pub fn item(&self, page: PageRef) -> RmapItem {
        self.regions.get(&page.region).map_or_else(RmapItem::default, |r| r.rmap.get(page.index))
    }

    /// Recomputes every counter from the rmap items and the stable tree (a
    /// self-check: it must equal [`Ksm::counters`]).
    pub fn recount(&self) -> Counters {
        let mut c = self.counters();
        let (mut items, mut unshared, mut zero, mut pinned, mut copies) = (0, 0, 0, 0, 0);
        let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
        for r in self.regions.values() {
            for (_, it) in r.rmap.linked_in(0, r.rmap.npages()) {
                match it.link() {
                    Link::Seen => items += 1,
                    Link::Pinned => {
                        items += 1;
                        pinned += 1
                    }
                    Link::PoolCopy => {
                        items += 1;
                        copies += 1
                    }
                    Link::Unstable => {
                        items += 1;
                        unshared += 1
                    }
                    Link::Stable(n) => {
                        items += 1;
                        *per_node.entry(n).or_default() += 1
                    }
                    Link::Zero => zero += 1,
                    Link::None => {}
                }
            }
        }
        let mappings: u64 = per_node.values().sum();
        c.rmap_items = items;
        c.pages_unshared = unshared;
        c.ksm_zero_pages = zero;
        c.pages_shared = per_node.len() as u64;
        c.pages_sharing = mappings - per_node.len() as u64;
        c.pages_volatile = items - mappings - unshared;
        c.pages_pinned = pinned;
        c.pages_pool_copies = copies;
        c
    }

    /// Checks the stable tree against the rmap items: every node's
    /// `rmap_hlist_len` equals the pages linked to it, none exceeds
    /// `max_page_sharing`, none is empty. Returns a description of the first
    /// violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
        for r in self.regions.values() {
            for (_, it) in r.rmap.linked_in(0, r.rmap.npages()) {
                if let Link::Stable(n) = it.link() {
                    *per_node.entry(n).or_default() += 1;
                }
            }
        }
        for id in self.stable.ids() {
            let n = self.stable.node(id);
            let linked = per_node.remove(&id).unwrap_or(0);
            if n.rmap_hlist_len != linked {
                return Err(format!("node {id:?}: rmap_hlist_len {} but {linked} pages link it", n.rmap_hlist_len));
            }
            if linked == 0 {
                return Err(format!("node {id:?} has no mapping but is alive"));
            }
            if linked > self.tunables.max_page_sharing {
                return Err(format!("node {id:?} has {linked} mappings > max_page_sharing"));
            }
        }
        if let Some((id, _)) = per_node.into_iter().next() {
            return Err(format!("pages link dead node {id:?}"));
        }
        if self.recount() != self.counters() {
            return Err(format!("counters {:?} != recount {:?}", self.counters(), self.recount()));
        }
        Ok(())
    }

    /// One batch of scanning (`ksm_do_scan(pages_to_scan)`). `now_ms` is a
    /// monotonic clock used to pace pruning.
    pub fn scan_batch(&mut self, space: &mut impl PageSpace, now_ms: u64) -> BatchReport {
        self.scan_batch_timed(space, now_ms, 0)
    }

    /// [`Ksm::scan_batch`] with the scanner thread's CPU time so far (ns),
    /// which the scan-time advisor needs.
    pub fn scan_batch_timed(&mut self, space: &mut impl PageSpace, now_ms: u64, cpu_ns: u64) -> BatchReport {
        let mut report = BatchReport::default();
        if self.tunables.run != Run::Merge || self.regions.is_empty() {
            return report;
        }
        self.forget_discarded(space);
        let mut budget = self.tunables.pages_to_scan.max(1) as usize;
        self.last_new_slot = None;
        // Bound the empty-region walking of one batch: a full pass at most.
        let mut region_steps = self.regions.len() + 1;
        while budget > 0 && region_steps > 0 {
            let (region, start) = match self.cursor {
                Some(c) if self.regions.contains_key(&c.0) => c,
                _ => {
                    // A scan starts over (after a full scan, or because the
                    // region under the cursor left): the unstable tree goes,
                    // so no page filed there can be visited again while a
                    // merge decided for it is still pending.
                    self.clear_unstable();
                    self.advisor.start_scan_ms = now_ms;
                    let first = *self.regions.keys().next().expect("regions not empty");
                    (first, 0)
                }
            };
            let state = &self.regions[&region];
            let npages = state.rmap.npages();
            // Released ranges are stepped over, never sampled.
            let (start, stop) = state.walkable(start);
            let mut samples = std::mem::take(&mut self.samples);
            samples.clear();
            // In chunks, so the scratch buffers stay small whatever pages_to_scan is.
            let mut walk_end = if start >= stop {
                stop
            } else {
                match space.sample(region, start, stop, budget.min(SAMPLE_CHUNK), &mut samples) {
                    Ok(e) => e.clamp(start, stop),
                    Err(_) => {
                        self.c.merge_errors += 1;
                        stop
                    }
                }
            };
            // A huge page is decided as a whole: its subpages past the chunk
            // are sampled too.
            if let Some(f) = samples.last().and_then(|s| s.huge).filter(|_| walk_end < stop) {
                let mut more = std::mem::take(&mut self.more_samples);
                more.clear();
                if let Ok(e) = space.sample(region, walk_end, stop, HUGE_SUBPAGES as usize, &mut more) {
                    let n = more.iter().take_while(|s| s.huge == Some(f)).count();
                    walk_end = if n < more.len() { more[n].index } else { e.clamp(walk_end, stop) };
                    samples.extend_from_slice(&more[..n]);
                }
                self.more_samples = more;
            }
            self.forget_absent(region, start, walk_end, &samples);
            let mut k = 0;
            while k < samples.len() {
                let s = samples[k];
                let (n, visited) = match s.huge {
                    Some(f) => {
                        let n = samples[k..].iter().take_while(|x| x.huge == Some(f)).count();
                        (n, self.visit_huge(space, region, f, &samples[k..k + n]))
                    }
                    None => (1, u64::from(self.visit(space, PageRef { region, index: s.index }, s.state))),
                };
                budget = budget.saturating_sub(n);
                report.pages_scanned += visited;
                self.c.pages_scanned += visited;
                k += n;
            }
            self.samples = samples;
            if self.intents.len() >= SAMPLE_CHUNK {
                self.flush(space, &mut report);
            }
            if walk_end >= npages {
                region_steps -= 1;
                match self.next_region_after(region) {
                    Some(next) => self.cursor = Some((next, 0)),
                    None => {
                        // End of a full scan: the next batch starts over, which
                        // throws the unstable tree away.
                        self.flush(space, &mut report);
                        self.c.full_scans += 1;
                        // Huge pages not met as huge pages in this scan are gone.
                        let scan = self.c.full_scans;
                        self.thp_memo.retain(|_, m| m.seen + 1 == scan);
                        self.split_frames.clear();
                        report.full_scan_ended = true;
                        if let Some(p) = scan_time_advisor(&mut self.advisor, &self.tunables, now_ms, cpu_ns) {
                            self.tunables.pages_to_scan = p;
                        }
                        self.cursor = None;
                        break;
                    }
                }
            } else {
                self.cursor = Some((region, walk_end));
            }
        }
        self.flush(space, &mut report);
        let prune_ms = self.tunables.stable_node_chains_prune_millisecs as u64;
        if now_ms.saturating_sub(self.last_prune_ms) >= prune_ms {
            self.prune(space, now_ms);
        }
        report
    }

    /// The pruning pass (`stable_node_chains_prune_millisecs`): chains left
    /// with one dup collapse into plain nodes; pool slots that something
    /// else still mapped are tried again.
    pub fn prune(&mut self, space: &mut impl PageSpace, now_ms: u64) {
        self.last_prune_ms = now_ms;
        if self.tunables.stable_node_defrag {
            self.defrag(space);
        }
        self.stable.prune();
        let deferred = std::mem::take(&mut self.deferred_slots);
        self.dead_slots.extend(deferred);
        self.free_dead_slots(space);
    }

    /// Defragmentation of dups (the "proper defrag" Andrea Arcangeli names as
    /// future work in the `max_page_sharing` thread on LKML, April 2016): in each chain,
    /// keep the `ceil(mappings / max_page_sharing)` busiest dups and refile
    /// the mappings of the others into their room. A refile is a merge of a
    /// page into another copy of the same content, under the same
    /// write-protect window, so no write is lost; the emptied dups are freed.
    fn defrag(&mut self, space: &mut impl PageSpace) {
        let max = self.tunables.max_page_sharing;
        // Per chain, the dups that stay and their room; per source dup, its chain.
        let mut rooms: Vec<Vec<(NodeId, u32)>> = Vec::new();
        let mut source_chain: BTreeMap<NodeId, usize> = BTreeMap::new();
        for mut dups in self.stable.chains() {
            dups.sort_by_key(|d| (std::cmp::Reverse(self.stable.node(*d).rmap_hlist_len), *d));
            let total: u64 = dups.iter().map(|d| self.stable.node(*d).rmap_hlist_len as u64).sum();
            let keep = total.div_ceil(max as u64).max(1) as usize;
            if dups.len() <= keep {
                continue;
            }
            for src in &dups[keep..] {
                source_chain.insert(*src, rooms.len());
            }
            rooms.push(dups[..keep].iter().map(|d| (*d, max - self.stable.node(*d).rmap_hlist_len)).collect());
        }
        if source_chain.is_empty() {
            return;
        }
        // The pages of the source dups, from the rmap items.
        let mut pages: Vec<(PageRef, NodeId)> = Vec::new();
        for (id, r) in &self.regions {
            for (index, it) in r.rmap.linked_in(0, r.rmap.npages()) {
                if let Link::Stable(n) = it.link() {
                    if source_chain.contains_key(&n) {
                        pages.push((PageRef { region: *id, index }, n));
                    }
                }
            }
        }
        for (page, src) in pages {
            let Some(t) = rooms[source_chain[&src]].iter_mut().find(|t| t.1 > 0) else { continue };
            t.1 -= 1;
            let target = t.0;
            let item = self.item(page);
            self.node_inc(target);
            self.relink(page, RmapItem::new(item.oldchecksum, Link::Stable(target)));
            let slot = self.stable.node(target).slot;
            self.intents.push(Intent { page, target: Target::Slot(slot) });
            self.pending.push(Pending { node: Some(target), refile_from: Some(src) });
        }
        let mut report = BatchReport::default();
        self.flush(space, &mut report);
    }

    fn next_region_after(&self, id: RegionId) -> Option<RegionId> {
        self.regions.range((Bound::Excluded(id), Bound::Unbounded)).next().map(|(k, _)| *k)
    }

    /// Pages in `[start, end)` that the page space did not report are absent.
    /// A page that maps its stable page but was never touched since is absent
    /// too and still merged, and so is a zero page the engine placed; any
    /// other rmap item for an absent page is dropped (the kernel frees rmap
    /// items of addresses that lost their page as its cursor passes them).
    fn forget_absent(&mut self, region: RegionId, start: u64, end: u64, samples: &[Sample]) {
        let state = &self.regions[&region];
        let mut present = samples.iter().map(|s| s.index).peekable();
        let mut gone = Vec::new();
        for (index, item) in state.rmap.linked_in(start, end) {
            while present.peek().is_some_and(|&p| p < index) {
                present.next();
            }
            if present.peek() == Some(&index) {
                continue;
            }
            if matches!(item.link(), Link::Seen | Link::Unstable) {
                gone.push(index);
            }
        }
        for index in gone {
            self.relink(PageRef { region, index }, RmapItem::default());
        }
    }

    /// Visits the subpages of one transparent huge page (`thp_split_min_subpages`):
    /// the merges decided for them are kept only if at least that many of
    /// its subpages would merge; otherwise they are undone, as failed merges
    /// are, the huge page stays whole, and it is left alone for 1, 2, 4,
    /// then 8 full scans. Returns the subpages visited.
    fn visit_huge(&mut self, space: &mut impl PageSpace, region: RegionId, frame: u64, samples: &[Sample]) -> u64 {
        self.c.thp_scanned += 1;
        let scan = self.c.full_scans;
        let key = (region, frame);
        if let Some(m) = self.thp_memo.get_mut(&key) {
            m.seen = scan;
            if m.skip > 0 {
                m.skip -= 1;
                self.c.pages_skipped += samples.len() as u64;
                return 0;
            }
        }
        let mark = self.intents.len();
        let (lo, hi) = (samples[0].index, samples[samples.len() - 1].index);
        let threshold = self.tunables.thp_split_min_subpages;
        self.in_huge = Some((region, lo..=hi, frame));
        self.huge_blocked = 0;
        let mut visited = 0;
        for s in samples {
            visited += u64::from(self.visit(space, PageRef { region, index: s.index }, s.state));
        }
        self.in_huge = None;
        let inside = |p: PageRef| p.region == region && (lo..=hi).contains(&p.index);
        let would = self.intents[mark..].iter().filter(|i| inside(i.page)).count() as u32 + self.huge_blocked;
        if would >= threshold {
            if would > 0 {
                self.note_split(region, frame);
                // Its subpages filed in the unstable tree are ordinary entries now.
                if !self.unstable_huge.is_empty() {
                    for index in lo..=hi {
                        self.unstable_huge.remove(&crate::unstable::pack(PageRef { region, index }));
                    }
                }
            }
            self.thp_memo.remove(&key);
            return visited;
        }
        if would == 0 {
            self.thp_memo.remove(&key);
            return visited;
        }
        // Kept whole: the decisions for its subpages are undone, and so are
        // those of the pages outside that they paired with (a stable page of
        // one mapping saves nothing); those go back to the unstable tree.
        let tail_intents = self.intents.split_off(mark);
        let tail_pending = self.pending.split_off(mark);
        let undone: Vec<(NodeId, u64)> = tail_intents
            .iter()
            .zip(&tail_pending)
            .filter(|(i, _)| inside(i.page))
            .filter_map(|(_, p)| p.node)
            .map(|n| (n, self.stable.node(n).hash))
            .collect();
        for (intent, p) in tail_intents.into_iter().zip(tail_pending) {
            let item = self.item(intent.page);
            if inside(intent.page) {
                self.relink(intent.page, RmapItem::new(item.oldchecksum, Link::Seen));
            } else if let Some(&(_, key)) = undone.iter().find(|(n, _)| Some(*n) == p.node) {
                self.relink(intent.page, RmapItem::new(item.oldchecksum, Link::Unstable));
                self.unstable.insert(key, intent.page);
            } else {
                self.intents.push(intent);
                self.pending.push(p);
                continue;
            }
            if let Some(n) = p.node {
                self.node_dec(n);
            }
        }
        let m = self.thp_memo.entry(key).or_insert(ThpMemo { would: 0, age: 0, skip: 0, seen: scan });
        m.would = would;
        m.skip = [1, 2, 4, 8][m.age.min(3) as usize];
        m.age = m.age.saturating_add(1);
        visited
    }

    /// Counts a huge page split for merging (once per full scan); its
    /// subpages filed in the unstable tree pair freely from now on (see
    /// `unstable_huge`).
    fn note_split(&mut self, region: RegionId, frame: u64) {
        if self.split_frames.insert((region, frame)) {
            self.c.thp_split += 1;
        }
    }

    /// Visits one present page; returns false if smart_scan skipped it.
    fn visit(&mut self, space: &mut impl PageSpace, page: PageRef, state: PageState) -> bool {
        let item = self.item(page);
        match (item.link(), state) {
            (Link::Stable(_), PageState::Pool) | (Link::Zero, PageState::ZeroPfn) => {}
            (Link::Stable(n), _) => {
                // Written since the merge (copy-on-write): the mapping is gone.
                self.c.cow_faults += 1;
                self.node_dec(n);
                match state {
                    PageState::Private => {
                        self.relink(page, RmapItem::new(item.oldchecksum, Link::Seen));
                        self.hash_and_merge(space, page);
                    }
                    PageState::PoolCopy => self.relink(page, RmapItem::new(item.oldchecksum, Link::PoolCopy)),
                    _ => self.relink(page, RmapItem::default()),
                }
            }
            (Link::Zero, PageState::Private) => {
                self.c.cow_faults += 1;
                self.relink(page, RmapItem::default());
                self.hash_and_merge(space, page);
            }
            // A private copy in a pool mapping is never replaced: it costs no
            // read, no hash, and stays an rmap item in no tree.
            (link, PageState::PoolCopy) => {
                if link == Link::Zero {
                    self.c.cow_faults += 1;
                }
                if link != Link::PoolCopy {
                    self.relink(page, RmapItem::new(item.oldchecksum, Link::PoolCopy));
                }
            }
            (_, PageState::Private) => {
                if self.should_skip(page, item) {
                    return false;
                }
                self.hash_and_merge(space, page);
            }
            // Zero pfn the engine did not place (read but never written
            // memory) is skipped, as the kernel skips it; a pool mapping the
            // engine does not know of is left alone.
            (_, PageState::ZeroPfn) | (_, PageState::Pool) => self.relink(page, RmapItem::default()),
        }
        true
    }

    /// smart_scan (Linux 6.7's `should_skip_rmap_item`): a page visited three
    /// times without merging is skipped for 1, 2, 4, then 8 visits in a row
    /// as it keeps failing; a merge resets its age.
    fn should_skip(&mut self, page: PageRef, item: RmapItem) -> bool {
        if !self.tunables.smart_scan || item.link() == Link::None {
            return false;
        }
        if self.in_huge.is_some() && self.tunables.thp_split_min_subpages > 1 {
            // A huge page is decided on all its subpages (it has its own back-off).
            return false;
        }
        let (age, skips) = (item.age(), item.remaining_skips());
        let older = age.saturating_add(1);
        if age < 3 {
            self.relink(page, item.with_age(older, skips));
            return false;
        }
        if skips == 0 {
            let next = match age {
                0..=3 => 1,
                4..=5 => 2,
                6..=8 => 4,
                _ => 8,
            };
            self.relink(page, item.with_age(older, next));
            return false;
        }
        self.c.pages_skipped += 1;
        // Skipped pages leave the unstable tree, as the kernel's do.
        let link = if item.link() == Link::Unstable { Link::Seen } else { item.link() };
        debug_assert!(matches!(link, Link::Seen | Link::Pinned), "only pages in no tree age: {link:?}");
        self.relink(page, RmapItem::new(item.oldchecksum, link).with_age(older, skips - 1));
        true
    }

    fn hash_and_merge(&mut self, space: &mut impl PageSpace, page: PageRef) {
        match space.hash_page(page) {
            Ok(hash) => self.cmp_and_merge_page(space, page, hash),
            Err(_) => {
                self.c.merge_errors += 1;
                self.relink(page, RmapItem::default());
            }
        }
    }

    fn cmp_and_merge_page(&mut self, space: &mut impl PageSpace, page: PageRef, hash: u64) {
        let item = self.item(page);
        let domain = self.domain(page.region).unwrap_or_default();
        let key = domain.key(hash);
        let checksum = checksum_of(hash);
        let unchanged = item.link() != Link::None && item.oldchecksum == checksum;
        // Every way out below relinks the page once, to where it ends up (a
        // page filed in the previous scan's unstable tree leaves it so).

        if self.tunables.use_zero_pages && unchanged && hash == zero_page_hash() {
            self.relink(page, RmapItem::new(checksum, Link::Zero));
            self.push_intent(page, Target::Zero, None);
            return;
        }

        if self.over_budget_scan == Some(self.c.full_scans) {
            // Out of mappings until the next scan: merging into a stable page
            // or making a new one would be refused again.
            self.relink(page, RmapItem::new(checksum, Link::Seen));
            return;
        }

        if let Some(n) = self
            .stable
            .lookup(key, self.tunables.max_page_sharing)
            .ok()
            .filter(|&n| self.stable.node(n).domain == domain)
        {
            self.node_inc(n);
            self.relink(page, RmapItem::new(checksum, Link::Stable(n)));
            let slot = self.stable.node(n).slot;
            self.push_intent(page, Target::Slot(slot), Some(n));
            return;
        }

        if !unchanged {
            // Volatile: remember the checksum, go no further this scan.
            self.relink(page, RmapItem::new(checksum, Link::Seen));
            return;
        }

        let Some(tree_page) = self.unstable.search_insert(key, page) else {
            self.relink(page, RmapItem::new(checksum, Link::Unstable));
            if let Some((r, range, frame)) = &self.in_huge {
                if *r == page.region && range.contains(&page.index) {
                    self.unstable_huge.insert(crate::unstable::pack(page), *frame);
                }
            }
            return;
        };
        let tree_item = self.item(tree_page);
        if tree_page == page
            || tree_item.link() != Link::Unstable
            || tree_item.oldchecksum != checksum
            || self.domain(tree_page.region) != Some(domain)
        {
            // A stale entry (the page moved on, or its region left).
            self.unstable.insert(key, page);
            self.relink(page, RmapItem::new(checksum, Link::Unstable));
            return;
        }
        // Filed from a huge page that is not split (yet)?
        let tree_frame = if self.unstable_huge.is_empty() {
            None
        } else {
            self.unstable_huge
                .get(&crate::unstable::pack(tree_page))
                .copied()
                .filter(|&g| !self.split_frames.contains(&(tree_page.region, g)))
        };
        if let Some(g) = tree_frame {
            // The match is a subpage of a huge page not split (yet).
            let same_huge = self.in_huge.as_ref().is_some_and(|(r, _, f)| *r == tree_page.region && *f == g);
            if same_huge || self.tunables.thp_split_min_subpages == 1 {
                // Pairing splits it (the kernel's behaviour at 1).
                if !same_huge {
                    self.note_split(tree_page.region, g);
                }
            } else {
                if self.in_huge.is_some() {
                    // A subpage of another huge page: it would merge (counted),
                    // but pairing would split the other one. The entry stays.
                    self.huge_blocked += 1;
                    self.unstable.insert(key, tree_page);
                    self.relink(page, RmapItem::new(checksum, Link::Seen));
                } else {
                    // A small page takes the entry's place, so small pages
                    // with this content still pair with each other.
                    self.unstable_huge.remove(&crate::unstable::pack(tree_page));
                    self.unstable.insert(key, page);
                    self.relink(page, RmapItem::new(checksum, Link::Unstable));
                }
                return;
            }
        }
        if let Err(()) = self.new_stable_page(space, page, tree_page, hash, domain) {
            // No slot, or the page changed under the copy: try next scan.
            self.unstable.insert(key, tree_page);
            self.relink(page, RmapItem::new(checksum, Link::Seen));
        }
    }

    /// Two pages met in the unstable tree: one pool slot, filled from `page`,
    /// becomes their stable page.
    fn new_stable_page(
        &mut self,
        space: &mut impl PageSpace,
        page: PageRef,
        tree_page: PageRef,
        hash: u64,
        domain: Domain,
    ) -> Result<(), ()> {
        let hint = match self.last_new_slot {
            Some((prev, s)) if prev.region == page.region && prev.index + 1 == page.index => Some(Slot(s.0 + 1)),
            _ => None,
        };
        let slot = self.pool.alloc(hint).ok_or(())?;
        let filled = space.fill_slot(page, slot);
        if filled != Ok(hash) {
            if filled.is_err() {
                self.c.merge_errors += 1;
            } else {
                self.c.merge_races += 1;
            }
            self.dead_slots.push(slot);
            return Err(());
        }
        // Dups of a chain must hold the same bytes, in the same domain: a
        // different content (or domain) with the same 64-bit key stays out of
        // the index.
        let key = domain.key(hash);
        let indexed = match self.stable.any_with_hash(key) {
            Some(other) => {
                let o = *self.stable.node(other);
                o.domain == domain && space.slots_equal(slot, o.slot).unwrap_or(false)
            }
            None => true,
        };
        let n = self.stable.insert(StableNode { slot, hash: key, domain, rmap_hlist_len: 0, indexed });
        self.last_new_slot = Some((page, slot));
        let checksum = checksum_of(hash);
        for p in [page, tree_page] {
            self.node_inc(n);
            self.relink(p, RmapItem::new(checksum, Link::Stable(n)));
            self.push_intent(p, Target::Slot(slot), Some(n));
        }
        Ok(())
    }

    fn push_intent(&mut self, page: PageRef, target: Target, node: Option<NodeId>) {
        self.intents.push(Intent { page, target });
        self.pending.push(Pending { node, refile_from: None });
    }

    /// Carries out the batch's merges and undoes the decisions of those that failed.
    fn flush(&mut self, space: &mut impl PageSpace, report: &mut BatchReport) {
        if !self.intents.is_empty() {
            let mut results = std::mem::take(&mut self.results);
            results.clear();
            space.merge(&self.intents, &mut results);
            results.resize(self.intents.len(), IntentResult::Failed);
            let intents = std::mem::take(&mut self.intents);
            let pending = std::mem::take(&mut self.pending);
            for ((intent, p), r) in intents.iter().zip(&pending).zip(&results) {
                if *r == IntentResult::Merged {
                    match p.refile_from {
                        Some(old) => {
                            self.c.stable_node_refiled += 1;
                            self.node_dec(old);
                        }
                        None => {
                            report.merged += 1;
                            self.c.merges += 1;
                        }
                    }
                    continue;
                }
                match r {
                    IntentResult::Mismatch => self.c.merge_races += 1,
                    IntentResult::OverBudget => {
                        self.c.vma_budget_skips += 1;
                        self.over_budget_scan = Some(self.c.full_scans);
                    }
                    IntentResult::Pinned => {}
                    _ => self.c.merge_errors += 1,
                }
                if let Some(n) = p.node {
                    self.node_dec(n);
                }
                let item = self.item(intent.page);
                let back = match (p.refile_from, r) {
                    (Some(old), _) => Link::Stable(old),
                    (None, IntentResult::Pinned) => Link::Pinned,
                    (None, _) => Link::Seen,
                };
                self.relink(intent.page, RmapItem::new(item.oldchecksum, back));
            }
            self.intents = intents;
            self.intents.clear();
            self.pending = pending;
            self.pending.clear();
            self.results = results;
        }
        self.free_dead_slots(space);
    }

    fn free_dead_slots(&mut self, space: &mut impl PageSpace) {
        if self.dead_slots.is_empty() {
            return;
        }
        let dead = std::mem::take(&mut self.dead_slots);
        let mut out = Vec::with_capacity(dead.len());
        space.release_slots(&dead, &mut out);
        out.resize(dead.len(), SlotRelease::Kept);
        for (slot, what) in dead.into_iter().zip(out) {
            match what {
                SlotRelease::Freed => {
                    self.pool.free(slot);
                    self.c.pool_slots_freed += 1;
                }
                // Its page is gone, but a pool copy still refers to it: the
                // slot is never handed out again (it holds no memory).
                SlotRelease::Retired => {
                    self.c.pool_slots_freed += 1;
                    self.c.pool_slots_retired += 1;
                }
                SlotRelease::Kept => self.deferred_slots.push(slot),
            }
        }
    }

    fn node_inc(&mut self, n: NodeId) {
        let node = self.stable.node_mut(n);
        node.rmap_hlist_len += 1;
        if node.rmap_hlist_len == 1 {
            self.live_nodes += 1;
        }
        self.mappings += 1;
    }

    fn node_dec(&mut self, n: NodeId) {
        let node = self.stable.node_mut(n);
        node.rmap_hlist_len -= 1;
        self.mappings -= 1;
        if node.rmap_hlist_len == 0 {
            self.live_nodes -= 1;
            let node = self.stable.remove(n);
            self.dead_slots.push(node.slot);
        }
    }

    /// Stores a page's item, keeping the counters in step with its link.
    /// A Seen or Unstable item with no age of its own keeps the page's
    /// smart_scan age.
    fn relink(&mut self, page: PageRef, mut item: RmapItem) {
        let Some(r) = self.regions.get_mut(&page.region) else {
            return;
        };
        let old_item = r.rmap.get(page.index);
        if item.age_bits() == 0 {
            item = item.with_age(old_item.age(), old_item.remaining_skips());
        }
        let old = old_item.link();
        r.rmap.set(page.index, item);
        let new = item.link();
        apply_link(&mut r.counts, old, -1);
        apply_link(&mut r.counts, new, 1);
        self.count_link(old, -1);
        self.count_link(new, 1);
    }

    fn count_link(&mut self, link: Link, d: i64) {
        let add = |x: &mut u64| *x = (*x as i64 + d) as u64;
        match link {
            Link::Seen | Link::Stable(_) => add(&mut self.c.rmap_items),
            Link::Unstable => {
                add(&mut self.c.rmap_items);
                add(&mut self.c.pages_unshared);
            }
            Link::Zero => add(&mut self.c.ksm_zero_pages),
            Link::Pinned => {
                add(&mut self.c.rmap_items);
                add(&mut self.c.pages_pinned);
            }
            Link::PoolCopy => {
                add(&mut self.c.rmap_items);
                add(&mut self.c.pages_pool_copies);
            }
            Link::None => {}
        }
    }
}

fn apply_link(c: &mut RegionCounters, link: Link, d: i64) {
    let add = |x: &mut u64| *x = (*x as i64 + d) as u64;
    match link {
        Link::Seen | Link::Unstable | Link::Pinned | Link::PoolCopy => add(&mut c.ksm_rmap_items),
        Link::Stable(_) => {
            add(&mut c.ksm_rmap_items);
            add(&mut c.ksm_merging_pages);
        }
        Link::Zero => add(&mut c.ksm_zero_pages),
        Link::None => {}
    }
}
