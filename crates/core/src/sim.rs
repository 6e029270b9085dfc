//! A simulated page space: deterministic memory for tests and fuzzing.
//!
//! Pages follow the kernel's rules as samepage relies on them: a write to a
//! page that maps a pool slot gets a private copy in place (copy-on-write:
//! a [`SimPage::PoolCopy`]), a pool slot never changes once filled, freeing a
//! slot that something maps is refused, and a page whose frame a device has
//! pinned is never replaced by a merge (`UFFDIO_MOVE` refuses it). Private
//! pages live in numbered [`Frame`]s, so a device's write through a pin
//! lands wherever that frame is: if the engine had replaced a pinned page,
//! the write would land in a frame nobody maps and the program would never
//! see it, which the model's content check catches.

use crate::page::{page_hash, PageRef, RegionId, Slot, PAGE_SIZE};
use crate::space::{Discard, Intent, IntentResult, PageSpace, PageState, Sample, SlotRelease, SpaceError, Target};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;

type Bytes = Box<[u8; PAGE_SIZE]>;

/// A physical page of private memory: an id (what a pin holds) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Unique within the space.
    pub id: u64,
    /// Content.
    pub bytes: Bytes,
}

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
    Private(Frame),
    /// Maps a pool slot.
    Pool(Slot),
    /// A private copy inside a mapping of pool slot `.1`, made by a write to
    /// a merged page.
    PoolCopy(Frame, Slot),
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
    /// Frames a device has pinned (`FOLL_PIN`), with their pin counts.
    pub pins: HashMap<u64, u32>,
    /// Slots whose page was freed while a pool copy still referred to them:
    /// filling one again would be a bug (a discarded copy would read it).
    pub retired: BTreeSet<Slot>,
    next_frame: u64,
}

/// Subpages of a transparent huge page.
pub const HUGE_PAGES: u64 = crate::page::HUGE_PAGE_SUBPAGES;

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
        for index in frame * HUGE_PAGES..(frame + 1) * HUGE_PAGES {
            let p = PageRef { region, index };
            if !matches!(self.page(p), SimPage::Private(_)) {
                let f = self.frame([0; PAGE_SIZE]);
                self.regions.get_mut(&region).expect("region")[index as usize] = SimPage::Private(f);
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
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => *f.bytes,
            SimPage::Pool(s) => *self.pool[s].0,
            _ => [0; PAGE_SIZE],
        }
    }

    fn frame(&mut self, bytes: [u8; PAGE_SIZE]) -> Frame {
        self.next_frame += 1;
        Frame { id: self.next_frame, bytes: Box::new(bytes) }
    }

    /// A write fault: a page that is not a private frame gets one, with its
    /// content (copy-on-write of a pool page stays inside the pool mapping).
    /// Returns the frame id.
    fn fault_write(&mut self, p: PageRef) -> u64 {
        let content = self.read(p);
        let next = match self.page(p) {
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => return f.id,
            SimPage::Released => panic!("{TOUCHED_RELEASED}: program write to a released page"),
            SimPage::Pool(s) => {
                let s = *s;
                SimPage::PoolCopy(self.frame(content), s)
            }
            _ => SimPage::Private(self.frame(content)),
        };
        let id = match &next {
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => f.id,
            _ => unreachable!(),
        };
        self.regions.get_mut(&p.region).expect("region")[p.index as usize] = next;
        id
    }

    fn frame_mut(&mut self, p: PageRef) -> &mut Frame {
        match &mut self.regions.get_mut(&p.region).expect("region")[p.index as usize] {
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => f,
            other => panic!("page {p:?} has no frame: {other:?}"),
        }
    }

    /// A write by the program: copy-on-write where the page is shared.
    pub fn write(&mut self, p: PageRef, offset: usize, bytes: &[u8]) {
        self.fault_write(p);
        self.frame_mut(p).bytes[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// A device pins page `p` for writing (`FOLL_PIN | FOLL_WRITE`: O_DIRECT
    /// read, io_uring fixed buffer): the write fault first (copy-on-write of
    /// a pool page), then the pin on the frame. Returns the frame's id.
    pub fn pin(&mut self, p: PageRef) -> u64 {
        let id = self.fault_write(p);
        *self.pins.entry(id).or_default() += 1;
        id
    }

    /// The device drops one pin of frame `id`.
    pub fn unpin(&mut self, id: u64) {
        if let Some(n) = self.pins.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&id);
            }
        }
    }

    /// The device writes through its pin of frame `id` (DMA): into the frame
    /// wherever it is mapped. Returns false if no page maps it any more (the
    /// write went to a page the program never reads again).
    pub fn device_write(&mut self, id: u64, offset: usize, byte: u8) -> bool {
        for pages in self.regions.values_mut() {
            for page in pages.iter_mut() {
                if let SimPage::Private(f) | SimPage::PoolCopy(f, _) = page {
                    if f.id == id {
                        f.bytes[offset] = byte;
                        return true;
                    }
                }
            }
        }
        false
    }

    fn is_pinned(&self, page: &SimPage) -> bool {
        match page {
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => self.pins.contains_key(&f.id),
            _ => false,
        }
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

    /// The pool is replaced by another (a daemon restarted): no page may map
    /// it any more; private copies inside its mappings become plain private
    /// pages, as the Linux page space makes them when it unmerges (every
    /// page of a pool mapping, copies included), and its pages go with it
    /// (a memfd's pages are freed with its last holder).
    pub fn replace_pool(&mut self) {
        for p in self.regions.values_mut().flatten() {
            assert!(!matches!(p, SimPage::Pool(_)), "a page still maps the old pool");
            if let SimPage::PoolCopy(f, _) = p {
                *p = SimPage::Private(f.clone());
            }
        }
        self.pool.clear();
        self.retired.clear();
    }

    /// Pool slots holding a page.
    pub fn pool_pages(&self) -> usize {
        self.pool.len()
    }

    /// Checks that every pool page still has the content it was filled with.
    pub fn pool_unchanged(&self) -> bool {
        self.pool.values().all(|(b, h)| page_hash(&b[..]) == *h)
    }

    /// Pool copies (pages written since their merge, inside pool mappings).
    pub fn pool_copies(&self) -> u64 {
        self.regions.values().flatten().filter(|p| matches!(p, SimPage::PoolCopy(..))).count() as u64
    }

    fn content(&self, page: &SimPage) -> [u8; PAGE_SIZE] {
        match page {
            SimPage::Released => panic!("{TOUCHED_RELEASED}"),
            SimPage::Private(f) | SimPage::PoolCopy(f, _) => *f.bytes,
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
                SimPage::PoolCopy(..) => PageState::PoolCopy,
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
        assert!(!self.retired.contains(&slot), "retired {slot:?} handed out again");
        if self.pool.contains_key(&slot) {
            // EEXIST: the slot holds a page already.
            return Err(SpaceError::Os { op: "fill_slot: slot in use", errno: 17 });
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
            if self.fail_every != 0 && self.merges_seen.is_multiple_of(self.fail_every) {
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
            if matches!(page, SimPage::PoolCopy(..)) {
                // Written since its merge and not visited since: only a
                // refile (defragmentation) proposes it. A pool copy is never
                // replaced (it may be pinned); left alone, as the Linux page
                // space leaves it.
                results.push(IntentResult::Mismatch);
                continue;
            }
            if self.is_pinned(page) {
                results.push(IntentResult::Pinned);
                continue;
            }
            let r = match (it.target, page) {
                (Target::Slot(s), SimPage::Private(_) | SimPage::Pool(_))
                    if self.pool.get(&s).is_some_and(|(c, _)| **c == self.content(page)) =>
                {
                    merged_slots.push((it.page, s));
                    self.split(it.page);
                    self.regions.get_mut(&it.page.region).expect("region")[it.page.index as usize] = SimPage::Pool(s);
                    IntentResult::Merged
                }
                (Target::Zero, SimPage::Private(f)) if f.bytes.iter().all(|&x| x == 0) => {
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
        // Pool copies stay where they are (a device may pin them); pages
        // mapping the pool or the engine's zero page get private frames.
        for (i, c) in contents {
            if matches!(self.regions[&region][i as usize], SimPage::Pool(_) | SimPage::KsmZero) {
                let f = self.frame(c);
                self.pages_mut(region)?[i as usize] = SimPage::Private(f);
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

    fn release_slots(&mut self, slots: &[Slot], out: &mut Vec<SlotRelease>) {
        let maps = self.slot_mappings();
        let copies: BTreeSet<Slot> = self
            .regions
            .values()
            .flatten()
            .filter_map(|p| match p {
                SimPage::PoolCopy(_, s) => Some(*s),
                _ => None,
            })
            .collect();
        for slot in slots {
            let mapped = maps.contains_key(slot) || self.foreign_maps.get(slot).is_some_and(|&n| n > 0);
            out.push(if mapped {
                SlotRelease::Kept
            } else if copies.contains(slot) {
                self.pool.remove(slot);
                self.retired.insert(*slot);
                SlotRelease::Retired
            } else {
                self.pool.remove(slot);
                SlotRelease::Freed
            });
        }
    }

    fn discard(&mut self, region: RegionId, range: Range<u64>, _how: Discard) -> Result<(), SpaceError> {
        let pages = self.pages_mut(region)?;
        let end = range.end.min(pages.len() as u64);
        for i in range.start..end {
            let p = &mut pages[i as usize];
            assert!(*p != SimPage::Released, "{TOUCHED_RELEASED}: discard of page {i}");
            *p = SimPage::Absent;
        }
        Ok(())
    }

    fn slots_equal(&mut self, a: Slot, b: Slot) -> Result<bool, SpaceError> {
        Ok(self.pool.get(&a).map(|x| &x.0) == self.pool.get(&b).map(|x| &x.0))
    }
}
