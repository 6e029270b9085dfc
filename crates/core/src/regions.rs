//! The registered regions (the kernel's `mm_slot`s and their VMAs): each
//! region's rmap items, its `/proc/PID/ksm_stat` counters, its trust domain
//! and the ranges the program took back. Every change of an rmap item goes
//! through [`Regions::relink`], which keeps the link tallies in step.

use crate::counters::RegionCounters;
use crate::links::LinkTally;
use crate::page::{Domain, PageRef, RegionId};
use crate::rmap::{Link, RmapItem, RmapTable};
use std::collections::BTreeMap;
use std::ops::{Bound, Range};

/// One region.
#[derive(Debug)]
struct Region {
    rmap: RmapTable,
    counts: RegionCounters,
    domain: Domain,
    /// Page ranges the program took back ([`Regions::release`]), sorted and
    /// disjoint: never sampled again.
    released: Vec<Range<u64>>,
}

/// The registered regions, in scan order.
#[derive(Debug, Default)]
pub struct Regions {
    map: BTreeMap<RegionId, Region>,
    tally: LinkTally,
}

impl Regions {
    /// Registers a region of `npages` pages in `domain`.
    pub fn add(&mut self, id: RegionId, npages: u64, domain: Domain) {
        let region =
            Region { rmap: RmapTable::new(npages), counts: RegionCounters::default(), domain, released: Vec::new() };
        if let Some(old) = self.map.insert(id, region) {
            self.forget_items(&old);
        }
    }

    /// Forgets a region and its rmap items.
    pub fn remove(&mut self, id: RegionId) {
        if let Some(old) = self.map.remove(&id) {
            self.forget_items(&old);
        }
    }

    fn forget_items(&mut self, r: &Region) {
        for (_, it) in r.rmap.linked_in(0, r.rmap.npages()) {
            self.tally.forget(it.link());
        }
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: RegionId) -> bool {
        self.map.contains_key(&id)
    }

    /// Whether no region is registered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Regions registered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Ids in scan order.
    pub fn ids(&self) -> Vec<RegionId> {
        self.map.keys().copied().collect()
    }

    /// The first region in scan order.
    pub fn first(&self) -> Option<RegionId> {
        self.map.keys().next().copied()
    }

    /// The region after `id` in scan order.
    pub fn next_after(&self, id: RegionId) -> Option<RegionId> {
        self.map.range((Bound::Excluded(id), Bound::Unbounded)).next().map(|(k, _)| *k)
    }

    /// Pages of region `id`.
    pub fn npages(&self, id: RegionId) -> Option<u64> {
        self.map.get(&id).map(|r| r.rmap.npages())
    }

    /// `range` clipped to region `id`'s pages (`None` for an unknown region).
    pub fn clip(&self, id: RegionId, range: Range<u64>) -> Option<Range<u64>> {
        let npages = self.npages(id)?;
        Some(range.start.min(npages)..range.end.min(npages))
    }

    /// The trust domain of region `id`.
    pub fn domain(&self, id: RegionId) -> Option<Domain> {
        self.map.get(&id).map(|r| r.domain)
    }

    /// The rmap item of a page (empty where none exists).
    pub fn item(&self, page: PageRef) -> RmapItem {
        self.map.get(&page.region).map_or_else(RmapItem::default, |r| r.rmap.get(page.index))
    }

    /// Stores a page's item, keeping the tallies in step with its link. A
    /// Seen, Unstable or Pinned item with no age of its own keeps the page's
    /// smart_scan age.
    pub fn relink(&mut self, page: PageRef, mut item: RmapItem) {
        let Some(r) = self.map.get_mut(&page.region) else {
            return;
        };
        let old = r.rmap.get(page.index);
        if item.age_bits() == 0 {
            item = item.with_age(old.age(), old.remaining_skips());
        }
        r.rmap.set(page.index, item);
        self.tally.moved(&mut r.counts, old.link(), item.link());
    }

    /// Linked pages of `range` of region `id` (none for an unknown region).
    pub fn linked_in(&self, id: RegionId, range: Range<u64>) -> impl Iterator<Item = (u64, RmapItem)> + '_ {
        self.map.get(&id).into_iter().flat_map(move |r| r.rmap.linked_in(range.start, range.end))
    }

    /// Every linked page, region by region.
    pub fn all_linked(&self) -> impl Iterator<Item = (PageRef, RmapItem)> + '_ {
        self.map.iter().flat_map(|(&region, r)| {
            r.rmap.linked_in(0, r.rmap.npages()).map(move |(index, it)| (PageRef { region, index }, it))
        })
    }

    /// Where sampling region `id` from `start` may go: `(from, to)` with
    /// `from` past any released range holding `start`, `to` the next released
    /// range's start (or the region's end).
    pub fn walkable(&self, id: RegionId, start: u64) -> (u64, u64) {
        let Some(r) = self.map.get(&id) else { return (start, start) };
        let mut from = start;
        for rel in &r.released {
            if rel.contains(&from) {
                from = rel.end;
            } else if rel.start > from {
                return (from, rel.start);
            }
        }
        (from, r.rmap.npages())
    }

    /// Marks `range` of region `id` released (its items must be gone).
    pub fn release(&mut self, id: RegionId, range: Range<u64>) {
        let Some(r) = self.map.get_mut(&id) else { return };
        r.released.push(range);
        r.released.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(r.released.len());
        for rel in r.released.drain(..) {
            match merged.last_mut() {
                Some(last) if rel.start <= last.end => last.end = last.end.max(rel.end),
                _ => merged.push(rel),
            }
        }
        r.released = merged;
    }

    /// The ranges of region `id` released so far, sorted and disjoint.
    pub fn released(&self, id: RegionId) -> Option<&[Range<u64>]> {
        self.map.get(&id).map(|r| &r.released[..])
    }

    /// Per-region counters, as `/proc/PID/ksm_stat` names them.
    pub fn counters(&self, id: RegionId) -> Option<RegionCounters> {
        let r = self.map.get(&id)?;
        Some(r.counts.clone().with_profit(r.rmap.metadata_bytes()))
    }

    /// The link tallies.
    pub fn tally(&self) -> &LinkTally {
        &self.tally
    }

    /// Bytes of the rmap tables.
    pub fn metadata_bytes(&self) -> u64 {
        self.map.values().map(|r| r.rmap.metadata_bytes()).sum()
    }

    /// Whether a page stands where an rmap item of the unstable tree should:
    /// linked Unstable with `checksum`, in `domain`.
    pub fn is_filed(&self, page: PageRef, checksum: u32, domain: Domain) -> bool {
        let it = self.item(page);
        it.link() == Link::Unstable && it.oldchecksum == checksum && self.domain(page.region) == Some(domain)
    }
}
