//! [`LinuxPageSpace`]: the core's page space on this process's real memory.
//!
//! A merge, for a window of nearby pages that the scanner wants merged:
//!
//! 1. write-protect the window (one `UFFDIO_WRITEPROTECT`): from now on a
//!    writer to any of its pages blocks in the kernel;
//! 2. compare each page with its target (pool slot or zeros), in full;
//! 3. replace each run of equal pages with one call: `mmap(MAP_FIXED)` of the
//!    run's consecutive pool slots, or `MADV_DONTNEED` for empty pages in
//!    anonymous memory (anonymous memory mapped over them where the range
//!    already maps the pool, whose `MADV_DONTNEED` would read the pool page
//!    again rather than zeros);
//! 4. lift the protection of the window, which wakes the blocked writers:
//!    they retry and land in the new mapping (a private copy of the pool
//!    page, or a fresh zeroed page), so no write is lost.
//!
//! If anything fails in between, [`Window`]'s drop lifts the protection, so a
//! writer never stays blocked, even on a panic.

use super::fault::Point;
use super::mem::{self, PageBuf};
use super::pagemap::{self, PageMap, PAGE_IS_FILE, PAGE_IS_HUGE, PAGE_IS_PFNZERO};
use super::pool::MemfdPool;
use super::uffd::{Uffd, UffdMode};
use super::vma::VmaBudget;
use super::SysError;
use samepage_core::{
    page_hash, Intent, IntentResult, PageRef, PageSpace, PageState, RegionId, Sample, Slot, SpaceError, Target,
    PAGE_SIZE,
};
use std::collections::HashMap;
use std::ops::Range;

/// A transparent huge page.
const HUGE_SIZE: usize = 2 << 20;

/// Pages closer than this share one write-protect window.
const WINDOW_GAP: u64 = 16;

#[derive(Debug)]
struct RegionMap {
    base: usize,
    npages: u64,
    /// Pages inside a mapping of the pool (merged, or copied-on-write since).
    pool_vma: Vec<u64>,
    /// Page ranges the program took back, sorted and disjoint: never touched.
    released: Vec<Range<u64>>,
}

impl RegionMap {
    /// The region's address ranges minus the released ones.
    fn pieces(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(self.released.len() + 1);
        let mut pos = 0;
        for r in &self.released {
            if r.start > pos {
                out.push((self.addr(pos), (r.start - pos) as usize * PAGE_SIZE));
            }
            pos = pos.max(r.end);
        }
        if pos < self.npages {
            out.push((self.addr(pos), (self.npages - pos) as usize * PAGE_SIZE));
        }
        out
    }

    /// Whether a released range meets pages `a..b`.
    fn released_between(&self, a: u64, b: u64) -> bool {
        self.released.iter().any(|r| r.start < b && a < r.end)
    }

    /// Registers the region's pieces with the userfaultfd (whole mappings,
    /// so nothing splits); mappings made since registration need it.
    fn register(&self, uffd: &Uffd) -> Result<(), SysError> {
        for (start, len) in self.pieces() {
            uffd.register(start, len)?;
        }
        Ok(())
    }

    fn addr(&self, index: u64) -> usize {
        self.base + index as usize * PAGE_SIZE
    }
    fn in_pool_vma(&self, i: u64) -> bool {
        self.pool_vma[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set_pool_vma(&mut self, from: u64, to: u64, v: bool) {
        for i in from..to {
            let w = &mut self.pool_vma[(i / 64) as usize];
            if v {
                *w |= 1 << (i % 64)
            } else {
                *w &= !(1 << (i % 64))
            }
        }
    }
}

/// System calls made, for benchmarks and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// `UFFDIO_WRITEPROTECT` calls.
    pub write_protects: u64,
    /// `mmap` calls mapping pool runs.
    pub pool_maps: u64,
    /// `MADV_DONTNEED` calls (zero pages).
    pub discards: u64,
    /// `PAGEMAP_SCAN` (or pagemap read) calls.
    pub pagemap_scans: u64,
    /// Pages hashed.
    pub pages_hashed: u64,
    /// Transparent huge pages replaced by small pages before merging (see
    /// [`LinuxPageSpace`]'s `split_huge`).
    pub huge_splits: u64,
}

/// A write-protected range; dropping it lifts the protection and wakes writers.
struct Window<'a> {
    uffd: &'a Uffd,
    start: usize,
    len: usize,
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        // Lifting the protection also wakes the range's waiters.
        if self.uffd.write_protect(self.start, self.len, false).is_err() {
            // Part of the range changed mappings (a run whose registration
            // failed): unprotect page by page, then wake the whole range.
            for p in (self.start..self.start + self.len).step_by(PAGE_SIZE) {
                let _ = self.uffd.write_protect(p, PAGE_SIZE, false);
            }
            let _ = self.uffd.wake(self.start, self.len);
        }
    }
}

/// The page space of this process.
#[derive(Debug)]
pub struct LinuxPageSpace {
    regions: HashMap<RegionId, RegionMap>,
    pool: MemfdPool,
    uffd: Uffd,
    pagemap: PageMap,
    budget: VmaBudget,
    buf: Box<PageBuf>,
    runs: Vec<pagemap::Run>,
    order: Vec<usize>,
    stats: SpaceStats,
    /// 2 MiB frames last sampled as transparent huge pages.
    huge: std::collections::HashSet<usize>,
}

impl LinuxPageSpace {
    /// Opens the userfaultfd, `/proc/self/pagemap` and a pool of `pool_slots` pages.
    /// `vma_share` is the share of the `vm.max_map_count` headroom the engine may use.
    pub fn new(pool_slots: u64, vma_share: f64) -> Result<Self, SysError> {
        Ok(LinuxPageSpace {
            regions: HashMap::new(),
            pool: MemfdPool::new(pool_slots)?,
            uffd: Uffd::open()?,
            pagemap: PageMap::open()?,
            budget: VmaBudget::new(vma_share),
            buf: PageBuf::new(),
            runs: Vec::new(),
            order: Vec::new(),
            stats: SpaceStats::default(),
            huge: std::collections::HashSet::new(),
        })
    }

    /// The userfaultfd's kind.
    pub fn uffd_mode(&self) -> UffdMode {
        self.uffd.mode()
    }

    /// Whether `PAGEMAP_SCAN` is used (else `/proc/self/pagemap` reads).
    pub fn has_pagemap_scan(&self) -> bool {
        self.pagemap.has_scan()
    }

    /// System calls made so far.
    pub fn stats(&self) -> &SpaceStats {
        &self.stats
    }

    /// The VMA limit the engine stays under.
    pub fn vma_limit(&self) -> u64 {
        self.budget.limit()
    }

    /// Re-reads `vm.max_map_count` and the mapping count.
    pub fn recount_vmas(&mut self) {
        self.budget.recount();
    }

    /// Registers `[base, base + npages pages)` with the userfaultfd.
    pub fn add_region(&mut self, id: RegionId, base: usize, npages: u64) -> Result<(), SysError> {
        self.uffd.register(base, npages as usize * PAGE_SIZE)?;
        self.regions.insert(
            id,
            RegionMap { base, npages, pool_vma: vec![0; npages.div_ceil(64) as usize], released: Vec::new() },
        );
        Ok(())
    }

    /// Forgets a region (after the core unmerged it) and unregisters it.
    pub fn remove_region(&mut self, id: RegionId) {
        if let Some(r) = self.regions.remove(&id) {
            let (start, end) = (r.base, r.addr(r.npages));
            self.huge.retain(|&f| f + HUGE_SIZE <= start || end <= f);
            // Released ranges may hold another region by now: left alone.
            for (start, len) in r.pieces() {
                let _ = self.uffd.unregister(start, len);
            }
        }
        self.budget.recount();
    }

    fn region(&self, id: RegionId) -> Result<&RegionMap, SpaceError> {
        self.regions.get(&id).ok_or(SpaceError::UnknownRegion(id))
    }

    /// Merges the intents `idx` (sorted, one region) that fall in one window.
    fn merge_window(&mut self, intents: &[Intent], idx: &[usize], results: &mut [IntentResult]) {
        let region = intents[idx[0]].page.region;
        let Some(r) = self.regions.get(&region) else {
            return;
        };
        let first = intents[idx[0]].page.index;
        let last = intents[*idx.last().expect("window not empty")].page.index;
        let (start, len) = (r.addr(first), (last - first + 1) as usize * PAGE_SIZE);
        self.stats.write_protects += 2;
        let window = super::fault::check(Point::WriteProtect, "UFFDIO_WRITEPROTECT")
            .and_then(|()| open_window(&self.uffd, r, start, len));
        let Ok(_window) = window else {
            return; // results stay Failed; nothing changed
        };
        // Compare, with writers held off.
        let mut equal = vec![false; idx.len()];
        for (k, &i) in idx.iter().enumerate() {
            let addr = r.addr(intents[i].page.index) as *const u8;
            // SAFETY: `addr` is a page of a registered region (the program
            // keeps it mapped while registered), write-protected: it holds still.
            unsafe { mem::read_page(addr, &mut self.buf) };
            equal[k] = match intents[i].target {
                Target::Slot(s) => self.buf.0[..] == *self.pool.slot_bytes(s),
                Target::Zero => mem::is_zero(&self.buf),
            };
            if !equal[k] {
                results[i] = IntentResult::Mismatch;
            }
        }
        // Replace each run of equal pages with one call.
        let r = self.regions.get_mut(&region).expect("region checked above");
        let mut k = 0;
        while k < idx.len() {
            if !equal[k] {
                k += 1;
                continue;
            }
            let mut end = k + 1;
            while end < idx.len() && equal[end] && {
                let (a, b) = (&intents[idx[end - 1]], &intents[idx[end]]);
                b.page.index == a.page.index + 1
                    && match (a.target, b.target) {
                        (Target::Slot(x), Target::Slot(y)) => y.0 == x.0 + 1,
                        (Target::Zero, Target::Zero) => r.in_pool_vma(a.page.index) == r.in_pool_vma(b.page.index),
                        _ => false,
                    }
            } {
                end += 1;
            }
            let from = intents[idx[k]].page.index;
            let to = from + (end - k) as u64;
            let (addr, rlen) = (r.addr(from), (to - from) as usize * PAGE_SIZE);
            let outcome = match intents[idx[k]].target {
                Target::Slot(s) => {
                    if !self.budget.allows(2) {
                        Err(IntentResult::OverBudget)
                    } else {
                        self.stats.pool_maps += 1;
                        let mapped =
                            super::fault::check(Point::MapPool, "mmap(pool, MAP_PRIVATE|MAP_FIXED)").and_then(|()| {
                                // SAFETY: the run is write-protected and equals the
                                // pool slots byte for byte: replacing it changes no
                                // content the program can observe.
                                unsafe {
                                    mem::map_file_private_fixed(addr, rlen, self.pool.fd(), s.0 * PAGE_SIZE as u64)
                                }
                            });
                        match mapped {
                            Ok(()) => {
                                // Not registered with the userfaultfd yet: that
                                // happens lazily, if it is ever protected again.
                                self.budget.spent(2);
                                r.set_pool_vma(from, to, true);
                                Ok(())
                            }
                            Err(_) => Err(IntentResult::Failed),
                        }
                    }
                }
                Target::Zero if r.in_pool_vma(from) => {
                    if !self.budget.allows(2) {
                        Err(IntentResult::OverBudget)
                    } else {
                        // SAFETY: the run is write-protected and all zeros;
                        // fresh anonymous memory reads as zeros too.
                        match unsafe { mem::map_anon(addr, rlen, true) } {
                            Ok(_) => {
                                self.budget.spent(2);
                                r.set_pool_vma(from, to, false);
                                Ok(())
                            }
                            Err(_) => Err(IntentResult::Failed),
                        }
                    }
                }
                Target::Zero => {
                    self.stats.discards += 1;
                    // SAFETY: anonymous, write-protected and all zeros: after
                    // MADV_DONTNEED it reads as zeros, the same content.
                    match unsafe { mem::discard(addr, rlen) } {
                        Ok(()) => Ok(()),
                        Err(_) => Err(IntentResult::Failed),
                    }
                }
            };
            for &i in &idx[k..end] {
                results[i] = match outcome {
                    Ok(()) => IntentResult::Merged,
                    Err(e) => e,
                };
            }
            k = end;
        }
        // `_window` drops here: protection lifted, writers woken.
    }

    /// Replaces the transparent huge page at `frame` with small pages of the
    /// same content before some of its subpages merge. Replacing one subpage
    /// in place would only split its page-table entry: the 2 MiB folio would
    /// stay allocated (on the kernel's deferred-split list, freed under
    /// memory pressure), so merging would free nothing until then. The kernel's
    /// KSM splits the folio itself; userspace copies it (see
    /// [`LinuxPageSpace::replace_with_copy`]), which frees the huge page at
    /// once. On any failure nothing changed and the merge goes on regardless
    /// (the huge page then waits for the kernel's deferred split).
    fn split_huge(&mut self, region: RegionId, frame: usize) {
        let Some(r) = self.regions.get(&region) else { return };
        if frame < r.base || frame + HUGE_SIZE > r.addr(r.npages) || !self.budget.allows(2) {
            return;
        }
        let first = ((frame - r.base) / PAGE_SIZE) as u64;
        let last = first + (HUGE_SIZE / PAGE_SIZE) as u64;
        // Only plain anonymous memory: no released range, no pool mapping.
        if r.released_between(first, last) || (first..last).any(|i| r.in_pool_vma(i)) {
            return;
        }
        if self.replace_with_copy(region, frame, HUGE_SIZE, true).is_ok() {
            self.budget.spent(2);
            self.stats.huge_splits += 1;
        }
    }

    /// Unmerges `[from, to)` of a region whose pages all lie in pool
    /// mappings, by [`LinuxPageSpace::replace_with_copy`].
    fn unmerge_pool_run(&mut self, region: RegionId, from: u64, to: u64) -> Result<(), SysError> {
        let r = &self.regions[&region];
        let (addr, len) = (r.addr(from), (to - from) as usize * PAGE_SIZE);
        self.replace_with_copy(region, addr, len, false)?;
        self.regions.get_mut(&region).expect("region").set_pool_vma(from, to, false);
        Ok(())
    }

    /// Replaces `[addr, addr+len)` of `region` with a copy of itself in
    /// fresh private anonymous memory (small pages only, with `small_pages`):
    /// the copy is made under write protection and moved over the range with
    /// one `mremap`, so no write is lost and whatever the range mapped before
    /// (pool pages, a huge page) is gone. On an error nothing changed. The new
    /// mapping is registered with the userfaultfd lazily, if it is ever
    /// protected again.
    fn replace_with_copy(
        &mut self,
        region: RegionId,
        addr: usize,
        len: usize,
        small_pages: bool,
    ) -> Result<(), SysError> {
        super::fault::check(Point::MapAnon, "mmap(MAP_ANONYMOUS)")?;
        // SAFETY: a fresh private mapping that only this function uses.
        let tmp = unsafe { mem::map_anon(0, len, false) }?;
        let result = (|| {
            if small_pages {
                mem::no_hugepage(tmp, len)?;
            }
            // Faulted in before the window opens, so writers wait less.
            mem::populate_write(tmp, len)?;
            let _window = open_window(&self.uffd, &self.regions[&region], addr, len)?;
            // SAFETY: `addr..+len` is registered memory, write-protected, so
            // it holds still; `tmp` is ours; both page aligned, no overlap.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, tmp as *mut u8, len) };
            // SAFETY: `tmp` is our own single mapping; the target holds the
            // same bytes, so replacing it changes nothing the program sees.
            unsafe { mem::move_mapping(tmp, len, addr) }
        })();
        if result.is_err() {
            // SAFETY: `tmp` is still ours (moving it is the last step).
            let _ = unsafe { mem::unmap(tmp, len) };
        }
        result
    }
}

/// Write-protects `[start, start+len)` of region `r` and returns the guard
/// that lifts the protection. Mappings made since the region was registered
/// are registered lazily: on a first failure the whole region is registered
/// (whole mappings, so nothing splits) and the protection tried once more.
/// The guard exists before the first attempt: a protection that fails part
/// way (at a mapping that is not registered) has protected the mappings
/// before it, and the guard lifts those too.
fn open_window<'a>(uffd: &'a Uffd, r: &RegionMap, start: usize, len: usize) -> Result<Window<'a>, SysError> {
    let window = Window { uffd, start, len };
    if uffd.write_protect(start, len, true).is_err() {
        r.register(uffd)?;
        uffd.write_protect(start, len, true)?;
    }
    Ok(window)
}

impl PageSpace for LinuxPageSpace {
    fn sample(
        &mut self,
        region: RegionId,
        start: u64,
        end: u64,
        max_present: usize,
        out: &mut Vec<Sample>,
    ) -> Result<u64, SpaceError> {
        let r = self.region(region)?;
        let base = r.base;
        let end = end.min(r.npages);
        let (from, to) = (r.addr(start), r.addr(end));
        self.runs.clear();
        self.stats.pagemap_scans += 1;
        let walk_end = self.pagemap.scan(from, to, max_present, &mut self.runs)?;
        for run in &self.runs {
            for addr in (run.start..run.end).step_by(PAGE_SIZE) {
                let index = ((addr - base) / PAGE_SIZE) as u64;
                let state = if run.categories & PAGE_IS_PFNZERO != 0 {
                    PageState::ZeroPfn
                } else if run.categories & PAGE_IS_FILE != 0 {
                    PageState::Pool
                } else {
                    PageState::Private
                };
                // A transparent huge page is keyed by its 2 MiB frame.
                let huge = (run.categories & PAGE_IS_HUGE != 0).then_some((addr >> 21) as u64);
                if huge.is_some() && addr % HUGE_SIZE == 0 {
                    self.huge.insert(addr);
                }
                out.push(Sample { index, state, huge });
            }
        }
        Ok(((walk_end - base) / PAGE_SIZE) as u64)
    }

    fn hash_page(&mut self, page: PageRef) -> Result<u64, SpaceError> {
        let addr = self.region(page.region)?.addr(page.index);
        // SAFETY: a page of a registered region, mapped while registered.
        unsafe { mem::read_page(addr as *const u8, &mut self.buf) };
        self.stats.pages_hashed += 1;
        Ok(page_hash(&self.buf.0))
    }

    fn fill_slot(&mut self, page: PageRef, slot: Slot) -> Result<u64, SpaceError> {
        let addr = self.region(page.region)?.addr(page.index);
        // SAFETY: a page of a registered region, mapped while registered.
        Ok(unsafe { self.pool.fill(slot, addr as *const u8, &mut self.buf) })
    }

    fn merge(&mut self, intents: &[Intent], results: &mut Vec<IntentResult>) {
        results.clear();
        results.resize(intents.len(), IntentResult::Failed);
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(0..intents.len());
        order.sort_unstable_by_key(|&i| (intents[i].page.region, intents[i].page.index));
        if !self.huge.is_empty() {
            for &i in &order {
                let page = intents[i].page;
                let Some(r) = self.regions.get(&page.region) else { continue };
                let frame = r.addr(page.index) & !(HUGE_SIZE - 1);
                if self.huge.remove(&frame) {
                    self.split_huge(page.region, frame);
                }
            }
        }
        let mut w = 0;
        while w < order.len() {
            // A window stays in one region and never spans a released range
            // (it is not registered with the userfaultfd).
            let region = intents[order[w]].page.region;
            let r = self.regions.get(&region);
            let mut end = w + 1;
            while end < order.len() && {
                let (a, b) = (intents[order[end - 1]].page, intents[order[end]].page);
                b.region == region
                    && b.index - a.index <= WINDOW_GAP
                    && !r.is_some_and(|r| r.released_between(a.index, b.index))
            } {
                end += 1;
            }
            self.merge_window(intents, &order[w..end], results);
            w = end;
        }
        self.order = order;
    }

    fn unmerge(&mut self, region: RegionId, range: Range<u64>, pages: &[u64]) -> Result<(), SpaceError> {
        let r = self.region(region)?;
        let end = range.end.min(r.npages);
        // Pool mappings: every page inside one, merged or copied since, so
        // that no mapping of the pool is left behind.
        let mut pool_runs = Vec::new();
        let mut i = range.start;
        while i < end {
            if r.pool_vma[(i / 64) as usize] == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            if r.in_pool_vma(i) {
                let from = i;
                while i < end && r.in_pool_vma(i) {
                    i += 1;
                }
                pool_runs.push((from, i));
            } else {
                i += 1;
            }
        }
        // Zero pages in anonymous memory: made private in place.
        let zero: Vec<u64> = pages.iter().copied().filter(|&p| !r.in_pool_vma(p)).collect();
        if pool_runs.is_empty() && zero.is_empty() {
            return Ok(());
        }
        for (from, to) in pool_runs {
            self.unmerge_pool_run(region, from, to)?;
        }
        let r = self.region(region)?;
        let mut k = 0;
        while k < zero.len() {
            let mut end = k + 1;
            while end < zero.len() && zero[end] == zero[end - 1] + 1 {
                end += 1;
            }
            mem::populate_write(r.addr(zero[k]), (end - k) * PAGE_SIZE)?;
            k = end;
        }
        self.budget.recount();
        Ok(())
    }

    fn release_range(&mut self, region: RegionId, range: Range<u64>) {
        let Some(r) = self.regions.get_mut(&region) else {
            return;
        };
        let range = range.start..range.end.min(r.npages);
        // Nothing of the engine's stays behind: the range was unmerged (no
        // pool mapping left) and leaves the userfaultfd, so what the program
        // does with it next (munmap, mremap, mprotect, register it again)
        // meets plain anonymous memory.
        let (start, end) = (r.addr(range.start), r.addr(range.end));
        let _ = self.uffd.unregister(start, end - start);
        r.released.push(range);
        r.released.sort_by_key(|x| x.start);
        // Huge pages of the released part are the program's now.
        self.huge.retain(|&f| f + HUGE_SIZE <= start || end <= f);
        self.budget.recount();
    }

    fn release_slots(&mut self, slots: &[Slot], freed: &mut Vec<bool>) {
        // Forks wait while slots are freed, and slots stay while a child (or
        // any descendant) still maps the pool: its mappings are invisible to
        // the mapcount when the child has not touched the page yet.
        let _no_fork = super::forkguard::hold();
        if super::forkguard::descendants_map(&self.pool.identity()) {
            freed.extend(slots.iter().map(|_| false));
            return;
        }
        for &slot in slots {
            freed.push(self.pool.release(slot, &self.pagemap).unwrap_or(false));
        }
    }

    fn slots_equal(&mut self, a: Slot, b: Slot) -> Result<bool, SpaceError> {
        Ok(self.pool.slot_bytes(a) == self.pool.slot_bytes(b))
    }
}
