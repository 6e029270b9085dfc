//! The scanner: the kernel's `ksm_do_scan`.
//!
//! Each call of [`Ksm::scan_batch`] visits up to `pages_to_scan` present pages
//! from the cursor on (the kernel's `ksm_scan`), region after region:
//!
//! 1. [`Ksm::next_chunk`]: the page space samples the next present pages
//!    (a transparent huge page always whole);
//! 2. [`Ksm::visit`]: each page's state is compared with its rmap item: a page
//!    still mapping its stable page (or its engine-placed zero page) costs
//!    nothing, a merged page written since lost its mapping, and smart_scan
//!    skips pages that keep failing; the rest are candidates;
//! 3. [`Ksm::cmp_and_merge_pages`] (in `merge.rs`): the candidates are hashed
//!    and go to the zero page, the stable tree, or the unstable tree, where
//!    pairs become new stable pages; merges are collected in the [`Batch`];
//! 4. [`Ksm::flush`]: the page space carries out the batch, and the
//!    decisions of merges it could not make are undone;
//! 5. at the end of a full scan the unstable tree goes, the advisor retunes
//!    `pages_to_scan`, and pruning runs on its own clock (`defrag.rs`).
//!
//! The state lives in types that own it: [`Regions`] (rmap items, link
//! tallies), a [`StableTree`], an [`UnstableTree`], a [`StablePool`] with its
//! [`DeadSlots`], the [`Batch`] and the [`HugePagePolicy`].

use crate::advisor::{scan_time_advisor, AdvisorCtx};
use crate::batch::{Batch, Decision, Outcome};
use crate::counters::{Counters, RegionCounters};
use crate::page::{Domain, NodeId, PageRef, RegionId, HUGE_PAGE_SUBPAGES};
use crate::pool::{DeadSlots, LocalPool, StablePool};
use crate::regions::Regions;
use crate::rmap::{Link, RmapItem};
use crate::space::{IntentResult, PageSpace, PageState, Sample, SpaceError};
use crate::stable::{LocalStableTree, NodeInfo, StableOp, StableReply, StableTree};
use crate::thp::{HugeDecision, HugePagePolicy};
use crate::tunables::{AdvisorMode, Run, TunableError, Tunables};
use crate::unstable::{LocalUnstableTree, UnstableOp, UnstableTree};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// Pages sampled, and merges collected, before they are processed.
const SAMPLE_CHUNK: usize = 2048;

/// The most address space one chunk of a batch's walk may cover, in
/// `pages_to_scan`s (see `scan_batch_timed`).
const MAX_SPAN_BUDGETS: u64 = 256;

/// Slots a [`LocalPool`] made by [`Ksm::new`] holds: 2^28 pages (1 TiB).
pub const DEFAULT_POOL_SLOTS: u64 = 1 << 28;

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

/// What the visit of a page found it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visit {
    /// smart_scan skipped it.
    Skipped,
    /// Nothing more to do.
    Done,
    /// Compare and merge it.
    Merge,
}

/// The scanner and its trees. Generic over the stable tree, the unstable
/// tree and the pool, so shared (multi-process) implementations can be
/// dropped in.
#[derive(Debug)]
pub struct Ksm<S: StableTree = LocalStableTree, U: UnstableTree = LocalUnstableTree, P: StablePool = LocalPool> {
    pub(crate) tunables: Tunables,
    pub(crate) regions: Regions,
    /// The next page to visit (the kernel's `ksm_scan`); `None` starts a full scan.
    cursor: Option<(RegionId, u64)>,
    pub(crate) stable: S,
    pub(crate) unstable: U,
    pub(crate) pool: P,
    pub(crate) dead: DeadSlots,
    pub(crate) batch: Batch,
    pub(crate) thp: HugePagePolicy,
    /// Event counters (the ones that follow from links and the stable tree
    /// are filled in by [`Ksm::counters`]).
    pub(crate) c: Counters,
    pub(crate) last_prune_ms: u64,
    advisor: AdvisorCtx,
    samples: Vec<Sample>,
    more_samples: Vec<Sample>,
    /// The last new stable page: its page and slot (the next page's new
    /// stable page takes the next slot, so runs map runs).
    pub(crate) last_new_slot: Option<(PageRef, crate::page::Slot)>,
    /// The full scan in which the page space refused a merge for its VMA
    /// budget: no more merges that need a mapping are tried in it.
    pub(crate) over_budget_scan: Option<u64>,
    /// Reply buffer for the stable tree.
    pub(crate) stable_replies: Vec<StableReply>,
}

impl Ksm {
    /// A scanner with the in-process trees and pool.
    pub fn new(tunables: Tunables) -> Result<Self, TunableError> {
        let stable = LocalStableTree::new(tunables.max_page_sharing);
        Self::with_parts(tunables, stable, LocalUnstableTree::new(), LocalPool::new(DEFAULT_POOL_SLOTS))
    }
}

impl<S: StableTree, U: UnstableTree, P: StablePool> Ksm<S, U, P> {
    /// A scanner over given trees and pool (the stable tree must have no
    /// node yet, or hold this engine's).
    pub fn with_parts(tunables: Tunables, mut stable: S, unstable: U, pool: P) -> Result<Self, TunableError> {
        tunables.validate()?;
        stable.set_max_page_sharing(tunables.max_page_sharing)?;
        Ok(Ksm {
            tunables,
            regions: Regions::default(),
            cursor: None,
            stable,
            unstable,
            pool,
            dead: DeadSlots::default(),
            batch: Batch::default(),
            thp: HugePagePolicy::default(),
            c: Counters::default(),
            last_prune_ms: 0,
            advisor: AdvisorCtx::default(),
            samples: Vec::new(),
            more_samples: Vec::new(),
            last_new_slot: None,
            over_budget_scan: None,
            stable_replies: Vec::new(),
        })
    }

    /// Puts new trees and a new pool in place of the ones in use, and
    /// returns the old ones: for an engine whose daemon went away and came
    /// back, which starts over with its successor's partition. Refused (the
    /// new parts handed back) while a merged page still links to the old
    /// ones (unmerge everything first, [`Ksm::unmerge_all`]). Zero pages
    /// stay: they map the kernel's zero page, no pool's; so do private
    /// copies inside mappings of the old pool (the program's own memory,
    /// never merged again). Slots still waiting to be freed belong to the
    /// old pool and are dropped with it.
    #[allow(clippy::type_complexity, reason = "the three parts, in and out")]
    pub fn replace_parts(&mut self, stable: S, unstable: U, pool: P) -> Result<(S, U, P), (S, U, P)> {
        let linked = self.regions.all_linked().any(|(_, it)| matches!(it.link(), Link::Stable(_)));
        if linked {
            return Err((stable, unstable, pool));
        }
        self.clear_unstable();
        let old_stable = std::mem::replace(&mut self.stable, stable);
        let old_unstable = std::mem::replace(&mut self.unstable, unstable);
        let old_pool = std::mem::replace(&mut self.pool, pool);
        self.dead = DeadSlots::default();
        self.last_new_slot = None;
        self.over_budget_scan = None;
        self.cursor = None;
        Ok((old_stable, old_unstable, old_pool))
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
        let old_max = self.tunables.max_page_sharing;
        if t.max_page_sharing != old_max {
            self.stable.set_max_page_sharing(t.max_page_sharing)?;
        }
        let advisor_changed = t.advisor_mode != self.tunables.advisor_mode;
        if !advisor_changed && t.advisor_mode != AdvisorMode::None && t.pages_to_scan != self.tunables.pages_to_scan {
            if t.max_page_sharing != old_max {
                self.stable.set_max_page_sharing(old_max).expect("no stable page exists: it was just changed");
            }
            return Err(TunableError::Refused {
                name: "pages_to_scan",
                why: "advisor_mode is scan-time: the advisor sets it (set advisor_mode=none first)",
            });
        }
        if advisor_changed {
            // The kernel's set_advisor_defaults().
            self.advisor = AdvisorCtx::default();
            t.pages_to_scan = match t.advisor_mode {
                AdvisorMode::None => 100,
                AdvisorMode::ScanTime => t.advisor_min_pages_to_scan,
            };
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
        self.regions.add(id, npages, domain);
    }

    /// The regions registered, in scan order.
    pub fn region_ids(&self) -> Vec<RegionId> {
        self.regions.ids()
    }

    /// The ranges of region `id` released so far, sorted and disjoint.
    pub fn released_ranges(&self, id: RegionId) -> Option<&[Range<u64>]> {
        self.regions.released(id)
    }

    /// Per-region counters, as `/proc/PID/ksm_stat` names them.
    pub fn region_counters(&self, id: RegionId) -> Option<RegionCounters> {
        self.regions.counters(id)
    }

    /// The rmap item of a page (empty where none exists).
    pub fn item(&self, page: PageRef) -> RmapItem {
        self.regions.item(page)
    }

    /// Unregisters a region (`MADV_UNMERGEABLE` then forget): every merged
    /// page, zero pages included, is made private again with its content
    /// intact. On an error (for example too little free memory to unshare)
    /// the region stays registered and nothing is lost.
    pub fn remove_region(&mut self, space: &mut impl PageSpace, id: RegionId) -> Result<(), SpaceError> {
        self.unmerge_region(space, id, 0..u64::MAX)?;
        self.thp.forget_region(id);
        self.regions.remove(id);
        if matches!(self.cursor, Some((r, _)) if r == id) {
            self.cursor = self.regions.next_after(id).map(|r| (r, 0));
        }
        self.reap(space);
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
        self.thp.shrink();
        self.batch.shrink();
        self.dead.shrink();
        self.samples = Vec::new();
        self.more_samples = Vec::new();
        self.stable_replies = Vec::new();
    }

    /// Throws the unstable tree away (keeping its allocation), with the
    /// record of entries filed from huge pages.
    pub(crate) fn clear_unstable(&mut self) {
        self.unstable.clear();
        self.thp.clear_filed();
    }

    /// Counters, with the kernel's names and meanings.
    pub fn counters(&self) -> Counters {
        let mut c = self.c.clone();
        self.regions.tally().fill(&mut c);
        // This engine's view (the whole tree's when it has it alone).
        c.metadata_bytes = self.metadata_bytes();
        c.derive_from_stable(&self.stable.held_stats());
        c.pool_slots_pending = self.dead.pending();
        c.thp_kept_whole = self.thp.kept_whole();
        c.thp_left_subpages = self.thp.left_subpages();
        c
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        let mut nodes = Vec::new();
        self.stable.nodes(&mut nodes);
        nodes
    }

    /// The fewest stable pages the current mappings need:
    /// `ceil(mappings / max_page_sharing)` per content (what defragmentation
    /// brings `pages_shared` down to).
    pub fn stable_pages_needed(&self) -> u64 {
        let mut per_content: HashMap<(u64, Domain), u64> = HashMap::new();
        for n in self.nodes() {
            *per_content.entry((n.key, n.domain)).or_default() += u64::from(n.mappings);
        }
        per_content.values().map(|m| m.div_ceil(u64::from(self.stable.max_page_sharing()))).sum()
    }

    /// Bytes of metadata: rmap tables, stable and unstable trees, pool bookkeeping.
    pub fn metadata_bytes(&self) -> u64 {
        self.regions.metadata_bytes()
            + self.stable.metadata_bytes()
            + self.unstable.metadata_bytes()
            + self.pool.metadata_bytes()
            + self.batch.metadata_bytes()
            + ((self.samples.capacity() + self.more_samples.capacity()) * std::mem::size_of::<Sample>()) as u64
    }

    /// Recomputes every counter from the rmap items and the stable tree (a
    /// self-check: it must equal [`Ksm::counters`]).
    pub fn recount(&self) -> Counters {
        let mut c = self.counters();
        let (mut items, mut unshared, mut zero, mut pinned, mut copies) = (0, 0, 0, 0, 0);
        let mut per_node: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (_, it) in self.regions.all_linked() {
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
        for (_, it) in self.regions.all_linked() {
            if let Link::Stable(n) = it.link() {
                *per_node.entry(n).or_default() += 1;
            }
        }
        for n in self.nodes() {
            let linked = per_node.remove(&n.id).unwrap_or(0);
            if n.mappings != linked {
                return Err(format!("node {:?}: rmap_hlist_len {} but {linked} pages link it", n.id, n.mappings));
            }
            if linked == 0 {
                return Err(format!("node {:?} has no mapping but is alive", n.id));
            }
            if linked > self.stable.max_page_sharing() {
                return Err(format!("node {:?} has {linked} mappings > max_page_sharing", n.id));
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
        self.last_new_slot = None;
        let mut budget = self.tunables.pages_to_scan.max(1) as usize;
        // Bound the empty-region walking of one batch: a full pass at most.
        let mut region_steps = self.regions.len() + 1;
        // Pages of address space the next chunk may walk (see below).
        let mut span = budget as u64;
        let max_span = (budget as u64).saturating_mul(MAX_SPAN_BUDGETS);
        while budget > 0 && region_steps > 0 {
            let (region, start) = self.cursor_or_new_scan(now_ms);
            // `pages_to_scan` counts every present page the scan passes, a
            // merged one included, as the kernel's `ksm_do_scan` does: a
            // page still mapping its stable page costs no read here, but the
            // page-table walk over it is work, and without counting it a
            // batch over merged memory walked the whole space (every batch a
            // full scan: 50 walks a second of each process at
            // `sleep_millisecs` 20). So a chunk walks at most `span` pages of
            // address space: as much as should hold the budget left at the
            // density of present pages the last chunk found, doubled after a
            // chunk that found none, so that a large hole (a guest's RAM not
            // touched yet) or sparse memory costs a few walks, not one per
            // `budget` pages; at most `MAX_SPAN_BUDGETS` budgets, which bounds
            // what one chunk past a hole may walk (and charge) at once.
            let walk_to = start.saturating_add(span);
            let (walk_end, walked) = self.scan_chunk(space, region, (start, walk_to), budget, &mut report);
            budget = budget.saturating_sub(walked);
            span = if walked == 0 {
                span.saturating_mul(2)
            } else {
                let covered = walk_end.saturating_sub(start).max(1);
                (covered.saturating_mul(budget as u64) / walked as u64).max(budget as u64)
            }
            .clamp(1, max_span);
            if self.batch.len() >= SAMPLE_CHUNK {
                self.flush(space, &mut report);
            }
            if walk_end < self.regions.npages(region).unwrap_or(0) {
                self.cursor = Some((region, walk_end));
                continue;
            }
            region_steps -= 1;
            // Another region: nothing is known of its density yet.
            span = budget as u64;
            match self.regions.next_after(region) {
                Some(next) => self.cursor = Some((next, 0)),
                None => {
                    self.end_full_scan(space, &mut report, now_ms, cpu_ns);
                    break;
                }
            }
        }
        self.flush(space, &mut report);
        let prune_ms = u64::from(self.tunables.stable_node_chains_prune_millisecs);
        if now_ms.saturating_sub(self.last_prune_ms) >= prune_ms {
            self.prune(space, now_ms);
        }
        report
    }

    /// Merges pages `range` of region `id` now, whatever `run` says, without
    /// moving the scan's cursor: merging on request (what upstream proposals
    /// for a synchronous `MADV_MERGEABLE` ask for). The caller vouches that
    /// the pages hold still, so they are visited twice: the first visit
    /// records their checksums (the kernel would wait a full scan for that),
    /// the second merges them into stable pages or with each other. Returns
    /// what the visits did.
    pub fn merge_range(&mut self, space: &mut impl PageSpace, id: RegionId, range: Range<u64>) -> BatchReport {
        let mut report = BatchReport::default();
        let Some(range) = self.regions.clip(id, range) else { return report };
        self.forget_discarded(space);
        for _ in 0..2 {
            let mut start = range.start;
            while start < range.end {
                let (walk_end, _) = self.scan_chunk(space, id, (start, range.end), SAMPLE_CHUNK, &mut report);
                self.flush(space, &mut report);
                start = walk_end.max(start + 1);
            }
        }
        report
    }

    /// Where the scan goes on; at the start of a full scan (after a full
    /// scan, or because the region under the cursor left) the unstable tree
    /// goes, so no page filed there can be visited again while a merge
    /// decided for it is still pending.
    fn cursor_or_new_scan(&mut self, now_ms: u64) -> (RegionId, u64) {
        match self.cursor {
            Some(c) if self.regions.contains(c.0) => c,
            _ => {
                self.clear_unstable();
                self.advisor.start_scan_ms = now_ms;
                (self.regions.first().expect("regions not empty"), 0)
            }
        }
    }

    /// Samples the next present pages of `region` from `start` up to `end`,
    /// at most `budget` (and a chunk), stepping over released ranges; a huge
    /// page cut by the chunk's end (or by `end`) is sampled whole. Returns
    /// where the walk stopped.
    fn next_chunk(
        &mut self,
        space: &mut impl PageSpace,
        region: RegionId,
        (start, end): (u64, u64),
        budget: usize,
        samples: &mut Vec<Sample>,
    ) -> u64 {
        samples.clear();
        let (start, stop) = self.regions.walkable(region, start);
        let bound = stop.min(end);
        if start >= bound {
            return start.max(bound);
        }
        let mut walk_end = match space.sample(region, start, bound, budget.min(SAMPLE_CHUNK), samples) {
            Ok(e) => e.clamp(start, bound),
            Err(_) => {
                self.c.merge_errors += 1;
                return bound;
            }
        };
        if let Some(f) = samples.last().and_then(|s| s.huge).filter(|_| walk_end < stop) {
            let mut more = std::mem::take(&mut self.more_samples);
            more.clear();
            if let Ok(e) = space.sample(region, walk_end, stop, HUGE_PAGE_SUBPAGES as usize, &mut more) {
                let n = more.iter().take_while(|s| s.huge == Some(f)).count();
                walk_end = if n < more.len() { more[n].index } else { e.clamp(walk_end, stop) };
                samples.extend_from_slice(&more[..n]);
            }
            self.more_samples = more;
        }
        walk_end
    }

    /// One chunk of the walk: samples from `start` (up to `end`), forgets
    /// the pages found absent, visits the rest. Returns where the walk
    /// stopped and how many present pages it passed: those sampled, and the
    /// merged ones still mapping their stable page (never sampled).
    fn scan_chunk(
        &mut self,
        space: &mut impl PageSpace,
        region: RegionId,
        (start, end): (u64, u64),
        budget: usize,
        report: &mut BatchReport,
    ) -> (u64, usize) {
        let mut samples = std::mem::take(&mut self.samples);
        let walk_end = self.next_chunk(space, region, (start, end), budget, &mut samples);
        let merged = self.forget_absent(region, start, walk_end, &samples);
        report.pages_scanned += self.visit_chunk(space, region, &samples);
        let walked = samples.len() + merged;
        self.samples = samples;
        (walk_end, walked)
    }

    /// Visits a chunk's samples: runs of small pages, and each huge page as
    /// a whole. Returns the pages visited (smart_scan's skips excluded).
    fn visit_chunk(&mut self, space: &mut impl PageSpace, region: RegionId, samples: &[Sample]) -> u64 {
        let mut visited = 0;
        let mut k = 0;
        while k < samples.len() {
            let huge = samples[k].huge;
            let n = samples[k..].iter().take_while(|x| x.huge == huge).count();
            let unit = &samples[k..k + n];
            visited += match huge {
                Some(frame) => self.visit_huge(space, region, frame, unit),
                None => self.visit_pages(space, region, unit),
            };
            k += n;
        }
        self.c.pages_scanned += visited;
        visited
    }

    /// Visits small pages, then compares and merges those that need it.
    fn visit_pages(&mut self, space: &mut impl PageSpace, region: RegionId, samples: &[Sample]) -> u64 {
        let mut visited = 0;
        let mut candidates = Vec::new();
        let mut released = Vec::new();
        for s in samples {
            let page = PageRef { region, index: s.index };
            match self.visit(page, s.state, &mut released) {
                Visit::Skipped => continue,
                Visit::Done => {}
                Visit::Merge => candidates.push(page),
            }
            visited += 1;
        }
        self.release_nodes(&released);
        self.cmp_and_merge_pages(space, &candidates);
        visited
    }

    /// Visits the subpages of one transparent huge page
    /// (`thp_split_min_subpages`, see [`HugePagePolicy`]); returns the
    /// subpages visited.
    fn visit_huge(&mut self, space: &mut impl PageSpace, region: RegionId, frame: u64, samples: &[Sample]) -> u64 {
        self.c.thp_scanned += 1;
        let subpages = samples[0].index..=samples[samples.len() - 1].index;
        if !self.thp.begin(region, frame, subpages, self.c.full_scans) {
            self.c.pages_skipped += samples.len() as u64;
            return 0;
        }
        let mark = self.batch.len();
        let visited = self.visit_pages(space, region, samples);
        let would = self.batch.since(mark).iter().filter(|i| self.thp.inside(i.page)).count() as u32;
        let threshold = self.tunables.thp_split_min_subpages;
        let (decision, newly_split) = self.thp.end(would, threshold, self.c.full_scans);
        if newly_split {
            self.c.thp_split += 1;
        }
        if decision == HugeDecision::KeepWhole {
            self.keep_whole(region, samples[0].index..=samples[samples.len() - 1].index, mark);
        }
        visited
    }

    /// Undoes the decisions for a huge page kept whole, and those of the
    /// pages outside that they paired with (a stable page of one mapping
    /// saves nothing); those go back to the unstable tree.
    fn keep_whole(&mut self, region: RegionId, subpages: std::ops::RangeInclusive<u64>, mark: usize) {
        let inside = |p: PageRef| p.region == region && subpages.contains(&p.index);
        let tail = self.batch.take_since(mark);
        let undone: Vec<NodeId> = tail.iter().filter(|(i, _)| inside(i.page)).filter_map(|(_, d)| d.node).collect();
        let (mut released, mut refiled) = (Vec::new(), Vec::new());
        for (intent, d) in tail {
            let item = self.regions.item(intent.page);
            if inside(intent.page) {
                self.regions.relink(intent.page, RmapItem::new(item.oldchecksum, Link::Seen));
            } else if d.node.is_some_and(|n| undone.contains(&n)) {
                self.regions.relink(intent.page, RmapItem::new(item.oldchecksum, Link::Unstable));
                refiled.push(UnstableOp::Insert { key: d.key, page: intent.page });
            } else {
                self.batch.push(intent.page, intent.target, d);
                continue;
            }
            released.extend(d.node);
        }
        self.release_nodes(&released);
        let mut replies = Vec::new();
        self.unstable.apply(&refiled, &mut replies);
    }

    /// Visits one present page: what its state says against its rmap item.
    /// Stable nodes whose mapping the page lost are appended to `released`.
    fn visit(&mut self, page: PageRef, state: PageState, released: &mut Vec<NodeId>) -> Visit {
        let item = self.regions.item(page);
        match (item.link(), state) {
            (Link::Stable(_), PageState::Pool) | (Link::Zero, PageState::ZeroPfn) => Visit::Done,
            (Link::Stable(n), _) => {
                // Written since the merge (copy-on-write): the mapping is gone.
                self.c.cow_faults += 1;
                released.push(n);
                match state {
                    PageState::Private => {
                        self.regions.relink(page, RmapItem::new(item.oldchecksum, Link::Seen));
                        Visit::Merge
                    }
                    PageState::PoolCopy => {
                        self.regions.relink(page, RmapItem::new(item.oldchecksum, Link::PoolCopy));
                        Visit::Done
                    }
                    _ => {
                        self.regions.relink(page, RmapItem::default());
                        Visit::Done
                    }
                }
            }
            (Link::Zero, PageState::Private) => {
                self.c.cow_faults += 1;
                self.regions.relink(page, RmapItem::default());
                Visit::Merge
            }
            // A private copy in a pool mapping is never replaced: it costs no
            // read, no hash, and stays an rmap item in no tree.
            (link, PageState::PoolCopy) => {
                if link == Link::Zero {
                    self.c.cow_faults += 1;
                }
                if link != Link::PoolCopy {
                    self.regions.relink(page, RmapItem::new(item.oldchecksum, Link::PoolCopy));
                }
                Visit::Done
            }
            (_, PageState::Private) => {
                if self.should_skip(page, item) {
                    Visit::Skipped
                } else {
                    Visit::Merge
                }
            }
            // Zero pfn the engine did not place (read but never written
            // memory) is skipped, as the kernel skips it; a pool mapping the
            // engine does not know of is left alone.
            (_, PageState::ZeroPfn) | (_, PageState::Pool) => {
                self.regions.relink(page, RmapItem::default());
                Visit::Done
            }
        }
    }

    /// smart_scan (Linux 6.7's `should_skip_rmap_item`): a page visited three
    /// times without merging is skipped for 1, 2, 4, then 8 visits in a row
    /// as it keeps failing; a merge resets its age.
    fn should_skip(&mut self, page: PageRef, item: RmapItem) -> bool {
        if !self.tunables.smart_scan || item.link() == Link::None {
            return false;
        }
        if self.thp.visiting() && self.tunables.thp_split_min_subpages > 1 {
            // A huge page is decided on all its subpages (it has its own back-off).
            return false;
        }
        let (age, skips) = (item.age(), item.remaining_skips());
        let older = age.saturating_add(1);
        if age < 3 {
            self.regions.relink(page, item.with_age(older, skips));
            return false;
        }
        if skips == 0 {
            let next = match age {
                0..=3 => 1,
                4..=5 => 2,
                6..=8 => 4,
                _ => 8,
            };
            self.regions.relink(page, item.with_age(older, next));
            return false;
        }
        self.c.pages_skipped += 1;
        // Skipped pages leave the unstable tree, as the kernel's do.
        let link = if item.link() == Link::Unstable { Link::Seen } else { item.link() };
        debug_assert!(matches!(link, Link::Seen | Link::Pinned), "only pages in no tree age: {link:?}");
        self.regions.relink(page, RmapItem::new(item.oldchecksum, link).with_age(older, skips - 1));
        true
    }

    /// Pages in `[start, end)` that the page space did not report are absent.
    /// A page that maps its stable page but was never touched since is absent
    /// too and still merged, and so is a zero page the engine placed; any
    /// other rmap item for an absent page is dropped (the kernel frees rmap
    /// items of addresses that lost their page as its cursor passes them).
    /// Returns how many merged pages still mapping their stable page the
    /// range holds (not sampled: they cost no read).
    fn forget_absent(&mut self, region: RegionId, start: u64, end: u64, samples: &[Sample]) -> usize {
        let mut present = samples.iter().map(|s| s.index).peekable();
        let mut gone = Vec::new();
        let mut merged = 0;
        for (index, item) in self.regions.linked_in(region, start..end) {
            while present.peek().is_some_and(|&p| p < index) {
                present.next();
            }
            if present.peek() == Some(&index) {
                continue;
            }
            match item.link() {
                Link::Stable(_) => merged += 1,
                Link::Seen | Link::Unstable => gone.push(index),
                _ => {}
            }
        }
        for index in gone {
            self.regions.relink(PageRef { region, index }, RmapItem::default());
        }
        merged
    }

    /// End of a full scan: the next batch starts over, which throws the
    /// unstable tree away; huge pages not met as huge pages in this scan
    /// are forgotten; the advisor retunes `pages_to_scan`.
    fn end_full_scan(&mut self, space: &mut impl PageSpace, report: &mut BatchReport, now_ms: u64, cpu_ns: u64) {
        self.flush(space, report);
        self.c.full_scans += 1;
        self.thp.end_full_scan(self.c.full_scans);
        report.full_scan_ended = true;
        if let Some(p) = scan_time_advisor(&mut self.advisor, &self.tunables, now_ms, cpu_ns) {
            self.tunables.pages_to_scan = p;
        }
        self.cursor = None;
    }

    /// Carries out the batch's merges and undoes the decisions of those that failed.
    pub(crate) fn flush(&mut self, space: &mut impl PageSpace, report: &mut BatchReport) {
        let carried = self.batch.carry_out(space);
        let mut released = Vec::new();
        for Outcome { intent, decision: Decision { node, refile_from, .. }, result } in carried.outcomes() {
            if result == IntentResult::Merged {
                match refile_from {
                    Some(old) => {
                        self.c.stable_node_refiled += 1;
                        released.push(old);
                    }
                    None => {
                        report.merged += 1;
                        self.c.merges += 1;
                    }
                }
                continue;
            }
            match result {
                IntentResult::Mismatch => self.c.merge_races += 1,
                IntentResult::OverBudget => {
                    self.c.vma_budget_skips += 1;
                    self.over_budget_scan = Some(self.c.full_scans);
                }
                IntentResult::Pinned => {}
                _ => self.c.merge_errors += 1,
            }
            released.extend(node);
            let item = self.regions.item(intent.page);
            let back = match (refile_from, result) {
                (Some(old), _) => Link::Stable(old),
                (None, IntentResult::Pinned) => Link::Pinned,
                (None, _) => Link::Seen,
            };
            self.regions.relink(intent.page, RmapItem::new(item.oldchecksum, back));
        }
        self.batch.recycle(carried);
        self.release_nodes(&released);
        self.reap(space);
    }

    /// Gives back one mapping of each node; the slots of nodes left with
    /// none go to the dead slots.
    pub(crate) fn release_nodes(&mut self, nodes: &[NodeId]) {
        if nodes.is_empty() {
            return;
        }
        let ops: Vec<StableOp> = nodes.iter().map(|&node| StableOp::Release { node }).collect();
        let mut replies = std::mem::take(&mut self.stable_replies);
        self.stable.apply(&ops, &mut replies);
        for r in &replies {
            if let StableReply::Released { freed: Some(slot) } = r {
                self.dead.push(*slot);
            }
        }
        self.stable_replies = replies;
    }

    /// Frees the pages of dead stable nodes' slots.
    pub(crate) fn reap(&mut self, space: &mut impl PageSpace) {
        self.dead.reap(space, &mut self.pool, &mut self.c);
        if self.stable.keeps_orphans() && self.dead.pending() > 0 {
            // Still mapped somewhere: any engine sharing the tree retries them.
            let kept = self.dead.take_kept();
            self.stable.return_orphans(&kept);
        }
    }
}
