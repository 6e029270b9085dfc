//! Transparent huge pages and `thp_split_min_subpages`: a huge page is
//! visited as a whole, and the merges decided for its subpages are kept only
//! if at least that many of them would merge. Below it they are undone (the
//! scanner does that, with the batch), the huge page stays whole, and it is
//! left alone for 1, 2, 4, then 8 full scans ([`BACKOFF`]).
//!
//! [`HugePagePolicy`] owns what that needs: the huge page being visited,
//! the huge pages kept whole and their back-off, the huge pages split in
//! this full scan, and which unstable-tree entries came from subpages of a
//! huge page not split (pairing with one would split it).

use crate::page::{PageRef, RegionId};
use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;

/// Full scans a huge page kept whole is left alone for, the first, second,
/// third and every later time in a row.
pub const BACKOFF: [u8; 4] = [1, 2, 4, 8];

/// A huge page kept whole below `thp_split_min_subpages`.
#[derive(Clone, Copy, Debug)]
struct KeptWhole {
    /// Subpages that would merge.
    would: u32,
    /// Times it was kept whole in a row (for the back-off).
    age: u8,
    /// Visits still to skip.
    skip: u8,
    /// The full scan it was last met in.
    seen: u64,
}

/// The huge page being visited.
#[derive(Clone, Debug)]
struct Visit {
    region: RegionId,
    subpages: RangeInclusive<u64>,
    frame: u64,
    /// Its subpages that would merge with a subpage of another huge page
    /// not split (a pairing held back).
    blocked: u32,
}

/// What became of a visited huge page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugeDecision {
    /// None of its subpages would merge.
    Nothing,
    /// Enough would merge: it is split, its merges stand.
    Split,
    /// Too few would merge: it stays whole; undo the merges decided for its
    /// subpages and those of the pages outside they paired with.
    KeepWhole,
}

/// The huge-page policy's state.
#[derive(Debug, Default)]
pub struct HugePagePolicy {
    kept_whole: HashMap<(RegionId, u64), KeptWhole>,
    visit: Option<Visit>,
    /// Unstable-tree entries filed from subpages of huge pages, with their
    /// huge page's key (pages packed with [`PageRef::pack`]).
    filed: HashMap<u64, u64>,
    /// Huge pages split in this full scan.
    split: HashSet<(RegionId, u64)>,
}

impl HugePagePolicy {
    /// Starts the visit of huge page `frame` of `region`, subpages `lo..=hi`,
    /// in full scan `scan`. Returns false if it is backing off (skip it).
    pub fn begin(&mut self, region: RegionId, frame: u64, subpages: RangeInclusive<u64>, scan: u64) -> bool {
        if let Some(m) = self.kept_whole.get_mut(&(region, frame)) {
            m.seen = scan;
            if m.skip > 0 {
                m.skip -= 1;
                return false;
            }
        }
        self.visit = Some(Visit { region, subpages, frame, blocked: 0 });
        true
    }

    /// Whether a huge page is being visited.
    pub fn visiting(&self) -> bool {
        self.visit.is_some()
    }

    /// Whether `page` is a subpage of the huge page being visited.
    pub fn inside(&self, page: PageRef) -> bool {
        self.visit.as_ref().is_some_and(|v| v.region == page.region && v.subpages.contains(&page.index))
    }

    /// Whether huge page `frame` of `region` is the one being visited.
    pub fn is_visiting(&self, region: RegionId, frame: u64) -> bool {
        self.visit.as_ref().is_some_and(|v| v.region == region && v.frame == frame)
    }

    /// A subpage of the visit would merge, but pairing would split another
    /// huge page: counted, not paired.
    pub fn block(&mut self) {
        if let Some(v) = &mut self.visit {
            v.blocked += 1;
        }
    }

    /// `page` was filed in the unstable tree: remember its huge page if it
    /// is a subpage of the visit.
    pub fn filed(&mut self, page: PageRef) {
        if let Some(v) = &self.visit {
            if v.region == page.region && v.subpages.contains(&page.index) {
                self.filed.insert(page.pack(), v.frame);
            }
        }
    }

    /// The huge page, not split (yet), that unstable-tree entry `page` was
    /// filed from.
    pub fn unsplit_frame_of(&self, page: PageRef) -> Option<u64> {
        if self.filed.is_empty() {
            return None;
        }
        self.filed.get(&page.pack()).copied().filter(|&f| !self.split.contains(&(page.region, f)))
    }

    /// The entry of `page` is an ordinary one from now on.
    pub fn forget_filed(&mut self, page: PageRef) {
        self.filed.remove(&page.pack());
    }

    /// Huge page `frame` of `region` is split for merging; true the first
    /// time in this full scan (count it).
    pub fn note_split(&mut self, region: RegionId, frame: u64) -> bool {
        self.split.insert((region, frame))
    }

    /// Ends the visit: `would` subpages got a merge decided. Returns the
    /// decision and whether the huge page was newly split.
    pub fn end(&mut self, would: u32, threshold: u32, scan: u64) -> (HugeDecision, bool) {
        let Some(v) = self.visit.take() else { return (HugeDecision::Nothing, false) };
        let key = (v.region, v.frame);
        let would = would + v.blocked;
        if would == 0 {
            self.kept_whole.remove(&key);
            return (HugeDecision::Nothing, false);
        }
        if would >= threshold {
            let newly = self.note_split(v.region, v.frame);
            // Its subpages filed in the unstable tree are ordinary entries now.
            if !self.filed.is_empty() {
                for index in v.subpages {
                    self.filed.remove(&PageRef { region: v.region, index }.pack());
                }
            }
            self.kept_whole.remove(&key);
            return (HugeDecision::Split, newly);
        }
        let m = self.kept_whole.entry(key).or_insert(KeptWhole { would: 0, age: 0, skip: 0, seen: scan });
        m.would = would;
        m.skip = BACKOFF[usize::from(m.age.min(3))];
        m.age = m.age.saturating_add(1);
        (HugeDecision::KeepWhole, false)
    }

    /// End of full scan `scan`: huge pages not met as huge pages in it are
    /// gone; none is split in the next one yet.
    pub fn end_full_scan(&mut self, scan: u64) {
        self.kept_whole.retain(|_, m| m.seen + 1 == scan);
        self.split.clear();
    }

    /// The unstable tree was thrown away.
    pub fn clear_filed(&mut self) {
        self.filed.clear();
    }

    /// Region `id` (or part of it) left.
    pub fn forget_region(&mut self, id: RegionId) {
        self.kept_whole.retain(|k, _| k.0 != id);
    }

    /// Gives memory back (no region left).
    pub fn shrink(&mut self) {
        *self = Self::default();
    }

    /// Huge pages kept whole now (`thp_kept_whole`).
    pub fn kept_whole(&self) -> u64 {
        self.kept_whole.len() as u64
    }

    /// Subpages that would merge in them (`thp_left_subpages`).
    pub fn left_subpages(&self) -> u64 {
        self.kept_whole.values().map(|m| u64::from(m.would)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_page_kept_whole_backs_off_1_2_4_8_scans() {
        let mut p = HugePagePolicy::default();
        let r = RegionId(1);
        let mut skipped_runs = Vec::new();
        let mut scan = 0;
        for _ in 0..6 {
            let mut skipped = 0;
            while !p.begin(r, 0, 0..=511, scan) {
                skipped += 1;
                scan += 1;
            }
            skipped_runs.push(skipped);
            assert_eq!(p.end(3, 10, scan), (HugeDecision::KeepWhole, false));
            scan += 1;
        }
        assert_eq!(skipped_runs, vec![0, 1, 2, 4, 8, 8]);
        assert_eq!((p.kept_whole(), p.left_subpages()), (1, 3));
    }

    #[test]
    fn enough_subpages_split_it_once_per_scan() {
        let mut p = HugePagePolicy::default();
        let r = RegionId(1);
        assert!(p.begin(r, 0, 0..=511, 0));
        p.filed(PageRef { region: r, index: 7 });
        assert_eq!(p.unsplit_frame_of(PageRef { region: r, index: 7 }), Some(0));
        assert_eq!(p.end(10, 10, 0), (HugeDecision::Split, true));
        assert_eq!(p.unsplit_frame_of(PageRef { region: r, index: 7 }), None);
        assert!(!p.note_split(r, 0), "counted once per full scan");
        p.end_full_scan(1);
        assert!(p.note_split(r, 0));
    }
}
