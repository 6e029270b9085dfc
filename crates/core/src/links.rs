//! Link counting: how many pages stand where in the trees, kept in step
//! with every change of an rmap item's [`Link`] (engine-wide and per
//! region), so the counters never need a walk. [`crate::Ksm::recount`]
//! walks anyway, as a self-check.

use crate::counters::{Counters, RegionCounters};
use crate::rmap::Link;

/// Engine-wide tallies of links, the counters that follow from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkTally {
    /// rmap items (every link but [`Link::None`] and [`Link::Zero`]).
    pub rmap_items: u64,
    /// [`Link::Unstable`]: `pages_unshared`.
    pub pages_unshared: u64,
    /// [`Link::Zero`]: `ksm_zero_pages`.
    pub ksm_zero_pages: u64,
    /// [`Link::Pinned`]: `pages_pinned`.
    pub pages_pinned: u64,
    /// [`Link::PoolCopy`]: `pages_pool_copies`.
    pub pages_pool_copies: u64,
}

impl LinkTally {
    /// A page's link went from `old` to `new`; `region` is its region's counters.
    pub fn moved(&mut self, region: &mut RegionCounters, old: Link, new: Link) {
        if old == new {
            return;
        }
        self.count(old, -1);
        self.count(new, 1);
        count_region(region, old, -1);
        count_region(region, new, 1);
    }

    /// A page with `link` left with its region (whose counters go too).
    pub fn forget(&mut self, link: Link) {
        self.count(link, -1);
    }

    fn count(&mut self, link: Link, d: i64) {
        let add = |x: &mut u64| *x = x.checked_add_signed(d).expect("link tally in step");
        match link {
            Link::Seen | Link::Stable(_) => add(&mut self.rmap_items),
            Link::Unstable => {
                add(&mut self.rmap_items);
                add(&mut self.pages_unshared);
            }
            Link::Zero => add(&mut self.ksm_zero_pages),
            Link::Pinned => {
                add(&mut self.rmap_items);
                add(&mut self.pages_pinned);
            }
            Link::PoolCopy => {
                add(&mut self.rmap_items);
                add(&mut self.pages_pool_copies);
            }
            Link::None => {}
        }
    }

    /// Copies the tallies into `c`.
    pub fn fill(&self, c: &mut Counters) {
        c.rmap_items = self.rmap_items;
        c.pages_unshared = self.pages_unshared;
        c.ksm_zero_pages = self.ksm_zero_pages;
        c.pages_pinned = self.pages_pinned;
        c.pages_pool_copies = self.pages_pool_copies;
    }
}

fn count_region(c: &mut RegionCounters, link: Link, d: i64) {
    let add = |x: &mut u64| *x = x.checked_add_signed(d).expect("region tally in step");
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
