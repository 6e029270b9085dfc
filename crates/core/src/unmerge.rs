//! Making merged pages private again, and forgetting pages the program took
//! back or discarded: the kernel's `unmerge_ksm_pages` (for `run = 2` and
//! `MADV_UNMERGEABLE`), and what its cursor does when it finds pages gone.

use crate::page::{NodeId, PageRef, RegionId};
use crate::pool::StablePool;
use crate::rmap::{Link, RmapItem};
use crate::scan::Ksm;
use crate::space::{Discard, PageSpace, SpaceError};
use crate::stable::StableTree;
use crate::tunables::Run;
use crate::unstable::UnstableTree;
use std::ops::Range;

impl<S: StableTree, U: UnstableTree, P: StablePool> Ksm<S, U, P> {
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
        self.reap(space);
        Ok(())
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
        self.reap(space);
        Ok(())
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
        let range = self.regions.clip(id, range).ok_or(SpaceError::UnknownRegion(id))?;
        if range.is_empty() {
            return Ok(());
        }
        self.unmerge_region(space, id, range.clone())?;
        let linked: Vec<u64> = self.regions.linked_in(id, range.clone()).map(|(i, _)| i).collect();
        for index in linked {
            // Seen or Unstable: an unstable-tree entry of the page is stale from now on.
            self.regions.relink(PageRef { region: id, index }, RmapItem::default());
        }
        space.release_range(id, range.clone());
        self.thp.forget_region(id);
        self.regions.release(id, range);
        self.reap(space);
        Ok(())
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
        let range = self.regions.clip(id, range).ok_or(SpaceError::UnknownRegion(id))?;
        if range.is_empty() {
            return Ok(());
        }
        space.discard(id, range.clone(), how)?;
        let mut released = Vec::new();
        let linked: Vec<(u64, RmapItem)> = self.regions.linked_in(id, range).collect();
        for (index, item) in linked {
            if let Link::Stable(n) = item.link() {
                released.push(n);
            }
            self.regions.relink(PageRef { region: id, index }, RmapItem::default());
        }
        self.release_nodes(&released);
        self.reap(space);
        Ok(())
    }

    /// Drops the links of merged pages the page space saw the program
    /// discard ([`PageSpace::drain_discarded`]): they read zeros now.
    pub(crate) fn forget_discarded(&mut self, space: &mut impl PageSpace) {
        let mut pages = Vec::new();
        space.drain_discarded(&mut pages);
        let mut released: Vec<NodeId> = Vec::new();
        for page in pages {
            // Only merged pages: a zero page stays one when discarded.
            if let Link::Stable(n) = self.regions.item(page).link() {
                released.push(n);
                self.regions.relink(page, RmapItem::default());
            }
        }
        self.release_nodes(&released);
        self.reap(space);
    }

    /// Unmerges `range` of region `id`: the page space makes every page
    /// there that maps the pool private, and the merged pages' links go back
    /// to "seen".
    pub(crate) fn unmerge_region(
        &mut self,
        space: &mut impl PageSpace,
        id: RegionId,
        range: Range<u64>,
    ) -> Result<(), SpaceError> {
        let range = self.regions.clip(id, range).ok_or(SpaceError::UnknownRegion(id))?;
        let merged: Vec<(u64, RmapItem)> = self
            .regions
            .linked_in(id, range.clone())
            .filter(|(_, it)| matches!(it.link(), Link::Stable(_) | Link::Zero))
            .collect();
        let indices: Vec<u64> = merged.iter().map(|(i, _)| *i).collect();
        // Called even with nothing merged: pages copied inside a pool mapping
        // since their merge leave it too.
        space.unmerge(id, range, &indices)?;
        self.c.unmerges += merged.len() as u64;
        let mut released = Vec::new();
        for (index, item) in merged {
            if let Link::Stable(n) = item.link() {
                released.push(n);
            }
            self.regions.relink(PageRef { region: id, index }, RmapItem::new(item.oldchecksum, Link::Seen));
        }
        self.release_nodes(&released);
        Ok(())
    }
}
