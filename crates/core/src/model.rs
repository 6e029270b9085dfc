//! A reference model for tests and fuzzing: the scanner on a simulated page
//! space next to a plain copy of what every page should hold, with the checks
//! that must hold after any sequence of operations. A violated property panics
//! with a description of it.

use crate::sim::{SimPage, SimPageSpace};
use crate::{Ksm, PageRef, RegionId, Run, Tunables, PAGE_SIZE};
use std::collections::{HashMap, HashSet};

/// One thing that happens to the memory or the engine. `region` and `page`
/// are indexes taken modulo the model's sizes, `offset` a byte offset modulo
/// the page size, `which` one of [`common`]'s contents, `slot` an index into
/// the slots mapped at the time.
#[allow(missing_docs, reason = "the fields are described above")]
#[derive(Clone, Debug)]
pub enum Op {
    /// Write one byte somewhere in a page.
    Poke { region: u8, page: u16, offset: u16, byte: u8 },
    /// Make a page one of a few common contents (0 = all zeros).
    Common { region: u8, page: u16, which: u8 },
    /// Read untouched memory (maps the zero page).
    Read { region: u8, page: u16 },
    /// Run some batches.
    Scan { batches: u8 },
    /// Unregister a region and register it again.
    Reregister { region: u8 },
    /// `run = 2`, then back to 1.
    UnmergeAll,
    /// A forked child starts or stops mapping some pool slot.
    Foreign { slot: u8, add: bool },
    /// The program takes `len % 16 + 1` pages from `page` on back (to unmap
    /// them); they are never used again.
    Release { region: u8, page: u16, len: u8 },
    /// A device pins a page for writing (O_DIRECT read, io_uring fixed buffer).
    Pin { region: u8, page: u16 },
    /// The device drops pin `which` (an index into the pins held).
    Unpin { which: u8 },
    /// The device writes a byte through pin `which` (DMA): the program must see it.
    DeviceWrite { which: u8, offset: u16, byte: u8 },
    /// The program discards `len % 16 + 1` pages from `page` on
    /// (`MADV_DONTNEED` through the engine): they read zeros afterwards.
    Discard { region: u8, page: u16, len: u8 },
}

impl Op {
    /// Decodes one operation from 6 bytes (for fuzzing).
    pub fn from_bytes(b: [u8; 6]) -> Op {
        let page = u16::from_le_bytes([b[2], b[3]]);
        match b[0] % 16 {
            0..=3 => Op::Poke { region: b[1], page, offset: u16::from_le_bytes([b[4], b[5]]), byte: b[5] },
            4..=9 => Op::Common { region: b[1], page, which: b[4] % 4 },
            10 => Op::Read { region: b[1], page },
            11..=13 => Op::Scan { batches: b[4] % 6 + 1 },
            14 => match b[1] % 5 {
                0 => Op::Reregister { region: b[4] },
                1 => Op::UnmergeAll,
                2 => Op::Foreign { slot: b[4], add: b[5] & 1 == 1 },
                3 => Op::Pin { region: b[4], page },
                _ => Op::Unpin { which: b[4] },
            },
            _ => match b[1] % 4 {
                0 => Op::Release { region: b[4], page, len: b[5] },
                1 => Op::Discard { region: b[4], page, len: b[5] },
                2 => Op::DeviceWrite { which: b[4], offset: u16::from_le_bytes([b[2], b[5]]), byte: b[3] },
                _ => Op::Scan { batches: 1 },
            },
        }
    }
}

/// One of a few common page contents (0: all zeros).
pub fn common(which: u8) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if which > 0 {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(which).wrapping_add(which);
        }
    }
    p
}

/// The scanner, its page space and the reference copy.
pub struct Model {
    /// The scanner.
    pub ksm: Ksm,
    /// The simulated memory.
    pub space: SimPageSpace,
    /// What each written page must hold (unwritten pages hold zeros).
    pub shadow: HashMap<PageRef, [u8; PAGE_SIZE]>,
    /// The regions, by position.
    pub ids: Vec<RegionId>,
    /// Pages per region.
    pub pages: u16,
    /// Pages the program took back (unmapped): never touched again.
    pub released: HashSet<PageRef>,
    /// Pins a device holds: the page pinned and the frame the pin holds.
    pub pins: Vec<(PageRef, u64)>,
    next_id: u32,
    now: u64,
}

impl Model {
    /// `regions` regions of `pages` untouched pages under tunables `t`.
    pub fn new(t: Tunables, regions: u8, pages: u16) -> Self {
        let mut w = Model {
            ksm: Ksm::new(t).expect("valid tunables"),
            space: SimPageSpace::new(),
            shadow: HashMap::new(),
            ids: Vec::new(),
            pages: pages.max(1),
            released: HashSet::new(),
            pins: Vec::new(),
            next_id: 0,
            now: 0,
        };
        for _ in 0..regions.max(1) {
            let id = w.fresh_region();
            w.ids.push(id);
        }
        w
    }

    fn fresh_region(&mut self) -> RegionId {
        let id = RegionId(self.next_id);
        self.next_id += 1;
        self.space.add_region(id, self.pages as u64);
        self.ksm.add_region(id, self.pages as u64);
        id
    }

    fn page(&self, region: u8, page: u16) -> PageRef {
        let r = region as usize % self.ids.len();
        PageRef { region: self.ids[r], index: (page % self.pages) as u64 }
    }

    /// Runs `batches` batches, 7 ms apart.
    pub fn scan(&mut self, batches: u32) {
        for _ in 0..batches {
            self.now += 7;
            self.ksm.scan_batch(&mut self.space, self.now);
        }
    }

    /// Applies one operation (indexes are taken modulo the sizes).
    pub fn apply(&mut self, op: &Op) {
        let page_of = match *op {
            Op::Poke { region, page, .. }
            | Op::Common { region, page, .. }
            | Op::Read { region, page }
            | Op::Pin { region, page } => Some(self.page(region, page)),
            _ => None,
        };
        if page_of.is_some_and(|p| self.released.contains(&p)) {
            return; // the program does not touch memory it unmapped
        }
        match *op {
            Op::Poke { region, page, offset, byte } => {
                let p = self.page(region, page);
                let offset = offset as usize % PAGE_SIZE;
                self.space.write(p, offset, &[byte]);
                self.shadow.entry(p).or_insert([0; PAGE_SIZE])[offset] = byte;
            }
            Op::Common { region, page, which } => {
                let p = self.page(region, page);
                let c = common(which);
                self.space.write(p, 0, &c);
                self.shadow.insert(p, c);
            }
            Op::Read { region, page } => {
                let p = self.page(region, page);
                self.space.touch_read(p);
            }
            Op::Scan { batches } => self.scan(batches as u32),
            Op::Reregister { region } => {
                let region = region as usize % self.ids.len();
                let old = self.ids[region];
                self.ksm.remove_region(&mut self.space, old).expect("unregister in the simulation");
                let pages = self.space.remove_region(old).expect("region");
                assert!(
                    pages.iter().all(|p| !matches!(p, SimPage::Pool(_) | SimPage::KsmZero)),
                    "unregister left a merged page"
                );
                // The program moved its memory: the device's pins there go.
                self.drop_pins(|p| p.region == old);
                let new = self.fresh_region();
                self.ids[region] = new;
                // Released pages come back as fresh untouched memory.
                self.released.retain(|p| p.region != old);
                // The program's memory moved to a fresh region: carry its content over.
                for (i, p) in pages.into_iter().enumerate() {
                    let old_ref = PageRef { region: old, index: i as u64 };
                    let new_ref = PageRef { region: new, index: i as u64 };
                    if let Some(c) = self.shadow.remove(&old_ref) {
                        self.shadow.insert(new_ref, c);
                    }
                    match p {
                        SimPage::Released => {
                            self.shadow.remove(&new_ref);
                        }
                        SimPage::Private(f) | SimPage::PoolCopy(f, _) => self.space.write(new_ref, 0, &f.bytes[..]),
                        SimPage::ZeroPfn => self.space.touch_read(new_ref),
                        _ => {}
                    }
                }
            }
            Op::UnmergeAll => {
                let mut t = self.ksm.tunables().clone();
                t.run = Run::Unmerge;
                self.ksm.set_tunables(t.clone()).expect("run=2");
                self.ksm.unmerge_all(&mut self.space).expect("unmerge in the simulation");
                assert!(self.space.slot_mappings().is_empty());
                assert_eq!(self.space.ksm_zero_pages(), 0);
                t.run = Run::Merge;
                self.ksm.set_tunables(t).expect("run=1");
            }
            Op::Release { region, page, len } => {
                let first = self.page(region, page);
                let end = (first.index + len as u64 % 16 + 1).min(self.pages as u64);
                self.ksm
                    .release_range(&mut self.space, first.region, first.index..end)
                    .expect("release in the simulation");
                for index in first.index..end {
                    let p = PageRef { region: first.region, index };
                    self.released.insert(p);
                    self.shadow.remove(&p);
                }
                self.drop_pins(|p| p.region == first.region && (first.index..end).contains(&p.index));
            }
            Op::Discard { region, page, len } => {
                let first = self.page(region, page);
                let end = (first.index + len as u64 % 16 + 1).min(self.pages as u64);
                if (first.index..end).any(|index| self.released.contains(&PageRef { region: first.region, index })) {
                    return;
                }
                self.ksm
                    .discard_range(&mut self.space, first.region, first.index..end, crate::Discard::DontNeed)
                    .expect("discard in the simulation");
                for index in first.index..end {
                    self.shadow.remove(&PageRef { region: first.region, index });
                }
                // The kernel's MADV_DONTNEED drops pinned pages too: what the
                // device writes after that is lost by the program's choice.
                self.drop_pins(|p| p.region == first.region && (first.index..end).contains(&p.index));
            }
            Op::Pin { region, page } => {
                let p = self.page(region, page);
                let frame = self.space.pin(p);
                self.pins.push((p, frame));
            }
            Op::Unpin { which } => {
                if !self.pins.is_empty() {
                    let (_, frame) = self.pins.swap_remove(which as usize % self.pins.len());
                    self.space.unpin(frame);
                }
            }
            Op::DeviceWrite { which, offset, byte } => {
                if !self.pins.is_empty() {
                    let (p, frame) = self.pins[which as usize % self.pins.len()];
                    let offset = offset as usize % PAGE_SIZE;
                    // The program reads what the device wrote: the pinned
                    // frame is still its page, unless the engine replaced it.
                    self.shadow.entry(p).or_insert([0; PAGE_SIZE])[offset] = byte;
                    self.space.device_write(frame, offset, byte);
                }
            }
            Op::Foreign { slot, add } => {
                let slots: Vec<_> = self.space.slot_mappings().keys().copied().collect();
                if let Some(s) = slots.get(slot as usize % slots.len().max(1)) {
                    let n = self.space.foreign_maps.entry(*s).or_default();
                    *n = if add { *n + 1 } else { n.saturating_sub(1) };
                }
            }
        }
    }

    fn drop_pins(&mut self, gone: impl Fn(&PageRef) -> bool) {
        let (dropped, kept): (Vec<_>, Vec<_>) = self.pins.drain(..).partition(|(p, _)| gone(p));
        self.pins = kept;
        for (_, frame) in dropped {
            self.space.unpin(frame);
        }
    }

    /// Content never changed, pool pages never changed, no slot above
    /// `max_page_sharing`, and the scanner's own invariants.
    pub fn check(&self) {
        for &id in &self.ids {
            for i in 0..self.pages as u64 {
                let p = PageRef { region: id, index: i };
                if self.released.contains(&p) {
                    assert_eq!(*self.space.page(p), SimPage::Released, "released page {p:?} was mapped again");
                    continue;
                }
                let want = self.shadow.get(&p).copied().unwrap_or([0; PAGE_SIZE]);
                assert!(self.space.read(p) == want, "content of {p:?} changed");
            }
        }
        assert!(self.space.pool_unchanged(), "a stable page changed");
        let max = self.ksm.tunables().max_page_sharing as u64;
        for (slot, n) in self.space.slot_mappings() {
            assert!(n <= max, "{slot:?} has {n} mappings > max_page_sharing {max}");
        }
        if let Err(e) = self.ksm.check_invariants() {
            panic!("{e}");
        }
    }

    /// After scans with no writes the engine knows everything: its counters
    /// must equal the page space's truth.
    pub fn check_quiesced(&mut self) {
        self.space.foreign_maps.clear();
        for _ in 0..4 {
            let before = self.ksm.counters().full_scans;
            while self.ksm.counters().full_scans == before {
                self.scan(1);
            }
        }
        self.now += 1_000_000;
        self.ksm.prune(&mut self.space, self.now);
        let c = self.ksm.counters();
        let maps = self.space.slot_mappings();
        let mappings: u64 = maps.values().sum();
        assert_eq!(c.pages_shared, maps.len() as u64, "pages_shared vs recount");
        assert_eq!(c.pages_sharing, mappings - maps.len() as u64, "pages_sharing vs recount");
        assert_eq!(c.ksm_zero_pages, self.space.ksm_zero_pages(), "ksm_zero_pages vs recount");
        assert_eq!(self.space.pool_pages() as u64, c.pages_shared, "pool holds exactly the stable pages");
        assert_eq!(c.pool_slots_pending, 0);
        assert_eq!(c.pages_pool_copies, self.space.pool_copies(), "pages_pool_copies vs recount");
        self.check();
    }
}
