//! A simulated page space: deterministic memory for tests and fuzzing.
//!
//! Pages follow the kernel's rules as samepage relies on them: a write to a
//! page that maps a pool slot or a zero page gets a private copy
//! (copy-on-write), a pool slot never changes once filled, and freeing a slot
//! that something maps is refused. Each simulated page also knows its
//! *logical* content, so a test can check that merging never changed what
//! the program sees.

use crate::page::{page_hash, PageRef, RegionId, Slot, PAGE_SIZE};
use crate::space::{Intent, IntentResult, PageSpace, PageState, Sample, SpaceError, Target};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

type Bytes = Box<[u8; PAGE_SIZE]>;

/// One simulated page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimPage {
    /// Never touched (reads as zeros).
    Absent,
    /// The zero page, mapped by a read of untouched memory.
    ZeroPfn,
    /// The zero page, placed by the engine.
    KsmZero,
    /// A private page.
    Private(Bytes),
    /// Maps a pool slot.
    Pool(Slot),
    /// Taken back by the program ([`PageSpace::release_range`]): unmapped,
    /// say. The engine touching it is a bug: the simulation panics.
    Released,
}

const TOUCHED_RELEASED: &str = "the engine touched a page of a released range";

/// A simulated page space.
#[derive(Debug, Default)]
pub struct SimPageSpace {
    regions: BTreeMap<RegionId, Vec<SimPage>>,
    pool: HashMap<Slot, (Bytes, u64)>,
    /// Mappings of pool slots held outside the engine's view (a forked child).
    pub foreign_maps: HashMap<Slot, u32>,
    /// Every n-th merge fails with [`IntentResult::Failed`] (0: never).
    pub fail_every: u64,
    merges_seen: u64,
    /// Runs (consecutive pages to consecutive slots) merged: what would be mappings.
    pub merge_runs: u64,
    /// Transparent huge pages: (region, index / 512) of aligned 512-page frames.
    huge: std::collections::BTreeSet<(RegionId, u64)>,
    /// Huge pages split because one of their subpages was merged.
    pub huge_splits: u64,
    /// Merges into pool slots allowed before every further one is refused
    /// with [`IntentResult::OverBudget`] (a VMA budget; `None`: no limit).
    pub map_budget: Option<u64>,
    /// Pool slots filled (new stable pages tried).
    pub fills: u64,
}

/// Subpages of a transparent huge page.
pub const HUGE_PAGES: u64 = 512;

impl SimPageSpace {
    /// An empty space.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a region of `npages` untouched pages.
    pub fn add_region(&mut self, id: RegionId, npages: u64) {
        self.regions.insert(id, vec![SimPage::Absent; npages as usize]);
    }

    /// Removes a region (after the engine unregistered it).
    pub fn remove_region(&mut self, id: RegionId) -> Option<Vec<SimPage>> {
        self.regions.remove(&id)
    }

    /// Makes pages `frame * 512 ..` of `region` one transparent huge page
    /// (the 512 pages must exist; they are populated, zeros where untouched).
    pub fn make_huge(&mut self, region: RegionId, frame: u64) {
        let pages = self.regions.get_mut(&region).expect("region");
        for p in &mut pages[(frame * HUGE_PAGES) as usize..((frame + 1) * HUGE_PAGES) as usize] {
            if !matches!(p, SimPage::Private(_)) {
                *p = SimPage::Private(Box::new([0; PAGE_SIZE]));
            }
        }
        self.huge.insert((region, frame));
    }

    /// Whether `frame` of `region` is still a huge page.
    pub fn is_huge(&self, region: RegionId, frame: u64) -> bool {
        self.huge.contains(&(region, frame))
    }

    /// Replacing a subpage's mapping splits its huge page, as on Linux.
    fn split(&mut self, p: PageRef) {
        if self.huge.remove(&(p.region, p.index / HUGE_PAGES)) {
            self.huge_splits += 1;
        }
    }

    /// The page itself.
    pub fn page(&self, p: PageRef) -> &SimPage {
        &self.regions[&p.region][p.index as usize]
    }

    /// What the program reads from page `p`.
    pub fn read(&self, p: PageRef) -> [u8; PAGE_SIZE] {
        match self.page(p) {
            SimPage::Private(b) => **b,
            SimPage::Pool(s) => *self.pool[s].0,
            _ => [0; PAGE_SIZE],
        }
    }

    /// A write by the program: copy-on-write where the page is shared.
    pub fn write(&mut self, p: PageRef, offset: usize, bytes: &[u8]) {
        let mut content = self.read(p);
        content[offset..offset + bytes.len()].copy_from_slice(bytes);
        self.regions.get_mut(&p.region).expect("region")[p.index as usize] = SimPage::Private(Box::new(content));
    }

    /// A read of untouched memory maps the zero page.
    pub fn touch_read(&mut self, p: PageRef) {
        let page = &mut self.regions.get_mut(&p.region).expect("region")[p.index as usize];
        if *page == SimPage::Absent {
            *page = SimPage::ZeroPfn;
        }
    }

    /// Pages mapping each pool slot (the truth the engine's counters must match).
    pub fn slot_mappings(&self) -> BTreeMap<Slot, u64> {
        let mut m = BTreeMap::new();
        for pages in self.regions.values() {
            for p in pages {
                if let SimPage::Pool(s) = p {
                    *m.entry(*s).or_default() += 1;
                }
            }
        }
        m
    }

    /// Pages holding an engine-placed zero page.
    pub fn ksm_zero_pages(&self) -> u64 {
        self.regions.values().flatten().filter(|p| **p == SimPage::KsmZero).count() as u64
    }

    /// Pool slots holding a page.
    pub fn pool_pages(&self) -> usize {
        self.pool.len()
    }

    /// Checks that every pool page still has the content it was filled with.
    pub fn pool_unchanged(&self) -> bool {
        self.pool.values().all(|(b, h)| page_hash(&b[..]) == *h)
    }

    fn content(&self, page: &SimPage) -> [u8; PAGE_SIZE] {
        match page {
            SimPage::Released => panic!("{TOUCHED_RELEASED}"),
            SimPage::Private(b) => **b,
            SimPage::Pool(s) => *self.pool[s].0,
            _ => [0; PAGE_SIZE],
        }
    }

    fn pages_mut(&mut self, id: RegionId) -> Result<&mut Vec<SimPage>, SpaceError> {
        self.regions.get_mut(&id).ok_or(SpaceError::UnknownRegion(id))
    }
}

impl PageSpace for SimPageSpace {
    fn sample(
        &mut self,
        region: RegionId,
        start: u64,
        end: u64,
        max_present: usize,
        out: &mut Vec<Sample>,
    ) -> Result<u64, SpaceError> {
        let pages = self.regions.get(&region).ok_or(SpaceError::UnknownRegion(region))?;
        let mut found = 0;
        for i in start..end.min(pages.len() as u64) {
            let state = match &pages[i as usize] {
                SimPage::Released => panic!("{TOUCHED_RELEASED}: sampled {region:?} page {i}"),
                SimPage::Absent => continue,
                SimPage::ZeroPfn | SimPage::KsmZero => PageState::ZeroPfn,
                SimPage::Pool(_) => PageState::Pool,
                SimPage::Private(_) => PageState::Private,
            };
            if found == max_present {
                return Ok(i);
            }
            let huge = self.huge.contains(&(region, i / HUGE_PAGES)).then_some(i / HUGE_PAGES);
            out.push(Sample { index: i, state, huge });
            found += 1;
        }
        Ok(end)
    }

    fn hash_page(&mut self, page: PageRef) -> Result<u64, SpaceError> {
        let pages = self.regions.get(&page.region).ok_or(SpaceError::UnknownRegion(page.region))?;
        Ok(page_hash(&self.content(&pages[page.index as usize])))
    }

    fn fill_slot(&mut self, page: PageRef, slot: Slot) -> Result<u64, SpaceError> {
        if self.pool.contains_key(&slot) {
            return Err(SpaceError::Os { op: "fill_slot", errno: format!("slot {} is in use", slot.0) });
        }
        let pages = self.regions.get(&page.region).ok_or(SpaceError::UnknownRegion(page.region))?;
        let content = self.content(&pages[page.index as usize]);
        let h = page_hash(&content);
        self.pool.insert(slot, (Box::new(content), h));
        self.fills += 1;
        Ok(h)
    }

    fn merge(&mut self, intents: &[Intent], results: &mut Vec<IntentResult>) {
        let mut merged_slots = Vec::new();
        for it in intents {
            self.merges_seen += 1;
            if self.fail_every != 0 && self.merges_seen % self.fail_every == 0 {
                results.push(IntentResult::Failed);
                continue;
            }
            let Some(pages) = self.regions.get(&it.page.region) else {
                results.push(IntentResult::Failed);
                continue;
            };
            if matches!(it.target, Target::Slot(_)) {
                if let Some(b) = self.map_budget.as_mut() {
                    if *b == 0 {
                        results.push(IntentResult::OverBudget);
                        continue;
                    }
                    *b -= 1;
                }
            }
            let page = &pages[it.page.index as usize];
            assert!(*page != SimPage::Released, "{TOUCHED_RELEASED}: merge of {:?}", it.page);
            let r = match (it.target, page) {
                (Target::Slot(s), SimPage::Private(_) | SimPage::Pool(_))
                    if self.pool.get(&s).is_some_and(|(c, _)| **c == self.content(page)) =>
                {
                    merged_slots.push((it.page, s));
                    self.split(it.page);
                    self.regions.get_mut(&it.page.region).expect("region")[it.page.index as usize] = SimPage::Pool(s);
                    IntentResult::Merged
                }
                (Target::Zero, SimPage::Private(b)) if b.iter().all(|&x| x == 0) => {
                    self.split(it.page);
                    self.regions.get_mut(&it.page.region).expect("region")[it.page.index as usize] = SimPage::KsmZero;
                    IntentResult::Merged
                }
                _ => IntentResult::Mismatch,
            };
            results.push(r);
        }
        // Count runs as a real page space would map them: sorted by address,
        // consecutive pages to consecutive slots share one mapping.
        merged_slots.sort();
        let mut prev: Option<(PageRef, Slot)> = None;
        for (p, s) in merged_slots {
            let continues = matches!(prev, Some((pp, ps))
                if pp.region == p.region && pp.index + 1 == p.index && ps.0 + 1 == s.0);
            if !continues {
                self.merge_runs += 1;
            }
            prev = Some((p, s));
        }
    }

    fn unmerge(&mut self, region: RegionId, range: Range<u64>, pages: &[u64]) -> Result<(), SpaceError> {
        let contents: Vec<(u64, [u8; PAGE_SIZE])> = {
            let ps = self.regions.get(&region).ok_or(SpaceError::UnknownRegion(region))?;
            pages
                .iter()
                .inspect(|i| assert!(range.contains(i), "unmerge of page {i} outside {range:?}"))
                .map(|&i| (i, self.content(&ps[i as usize])))
                .collect()
        };
        let ps = self.pages_mut(region)?;
        for (i, c) in contents {
            if matches!(ps[i as usize], SimPage::Pool(_) | SimPage::KsmZero) {
                ps[i as usize] = SimPage::Private(Box::new(c));
            }
        }
        Ok(())
    }

    fn release_range(&mut self, region: RegionId, range: Range<u64>) {
        let pages = self.regions.get_mut(&region).expect("released range of a known region");
        for i in range {
            let p = &mut pages[i as usize];
            assert!(!matches!(p, SimPage::Pool(_) | SimPage::KsmZero), "page {i} released while merged");
            *p = SimPage::Released;
        }
    }

    fn release_slots(&mut self, slots: &[Slot], freed: &mut Vec<bool>) {
        let maps = self.slot_mappings();
        for slot in slots {
            let mapped = maps.contains_key(slot) || self.foreign_maps.get(slot).is_some_and(|&n| n > 0);
            if !mapped {
                self.pool.remove(slot);
            }
            freed.push(!mapped);
        }
    }

    fn slots_equal(&mut self, a: Slot, b: Slot) -> Result<bool, SpaceError> {
        Ok(self.pool.get(&a).map(|x| &x.0) == self.pool.get(&b).map(|x| &x.0))
    }
}
