//! The stable pool's slots: which pool pages are in use, and the slots of
//! dead stable pages on their way back.
//!
//! Slots for pages that merge as a run are handed out consecutively (each
//! request may ask for the slot after the previous one), so a run of pages
//! maps a run of slots with one mapping. [`StablePool`] is batched, like the
//! trees, so a pool shared by several processes can serve it; [`LocalPool`]
//! is the in-process one. [`DeadSlots`] holds the slots whose stable page
//! lost its last mapping until the page space has freed their memory.

use crate::counters::Counters;
use crate::page::Slot;
use crate::space::{PageSpace, SlotRelease};
use std::collections::BTreeSet;

/// Which slot a request would like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum SlotHint {
    /// Any free slot.
    Any,
    /// This slot if it is free, else any.
    Exactly(Slot),
    /// The slot after the one handed to the previous request of the batch
    /// if it is free, else any.
    FollowPrevious,
}

/// Slot bookkeeping of the stable pool.
pub trait StablePool {
    /// One slot per hint, written into `out` (`None` when the pool is full).
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>);
    /// Returns slots whose pages have been freed.
    fn free(&mut self, slots: &[Slot]);
    /// Slots in use.
    fn in_use(&self) -> u64;
    /// Bytes of memory the bookkeeping uses.
    fn metadata_bytes(&self) -> u64;
}

/// In-process slot allocator: a bump pointer plus a set of freed slots.
#[derive(Debug)]
pub struct LocalPool {
    capacity: u64,
    bump: u64,
    freed: BTreeSet<u64>,
}

impl LocalPool {
    /// A pool of `capacity` slots.
    pub fn new(capacity: u64) -> Self {
        LocalPool { capacity, bump: 0, freed: BTreeSet::new() }
    }

    fn alloc_one(&mut self, hint: Option<Slot>) -> Option<Slot> {
        if let Some(Slot(h)) = hint {
            if h == self.bump && h < self.capacity {
                self.bump += 1;
                return Some(Slot(h));
            }
            if self.freed.remove(&h) {
                return Some(Slot(h));
            }
        }
        if let Some(s) = self.freed.pop_first() {
            return Some(Slot(s));
        }
        if self.bump < self.capacity {
            self.bump += 1;
            return Some(Slot(self.bump - 1));
        }
        None
    }

    fn free_one(&mut self, slot: Slot) {
        debug_assert!(slot.0 < self.bump && !self.freed.contains(&slot.0));
        if slot.0 + 1 == self.bump {
            self.bump -= 1;
            while let Some(&last) = self.freed.last() {
                if last + 1 != self.bump {
                    break;
                }
                self.freed.pop_last();
                self.bump -= 1;
            }
        } else {
            self.freed.insert(slot.0);
        }
    }
}

impl StablePool for LocalPool {
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        out.clear();
        for hint in hints {
            let wanted = match *hint {
                SlotHint::Any => None,
                SlotHint::Exactly(s) => Some(s),
                SlotHint::FollowPrevious => out.last().copied().flatten().map(|s| Slot(s.0 + 1)),
            };
            let slot = self.alloc_one(wanted);
            out.push(slot);
        }
    }

    fn free(&mut self, slots: &[Slot]) {
        for &s in slots {
            self.free_one(s);
        }
    }

    fn in_use(&self) -> u64 {
        self.bump - self.freed.len() as u64
    }

    fn metadata_bytes(&self) -> u64 {
        (self.freed.len() * 16) as u64
    }
}

/// Slots of stable pages that lost their last mapping: freed by the page
/// space at the end of each step, or kept for a later prune while something
/// outside the engine's knowledge (a forked child) still maps them.
#[derive(Debug, Default)]
pub struct DeadSlots {
    dead: Vec<Slot>,
    deferred: Vec<Slot>,
    out: Vec<SlotRelease>,
}

impl DeadSlots {
    /// A slot whose page can go.
    pub fn push(&mut self, slot: Slot) {
        self.dead.push(slot);
    }

    /// Slots kept for a later try.
    pub fn pending(&self) -> u64 {
        self.deferred.len() as u64
    }

    /// The kept slots are tried again at the next [`DeadSlots::reap`] (the prune).
    pub fn retry_kept(&mut self) {
        let kept = std::mem::take(&mut self.deferred);
        self.dead.extend(kept);
    }

    /// Asks the page space to free the dead slots' pages and gives the freed
    /// slots back to the pool, counting them.
    pub fn reap(&mut self, space: &mut impl PageSpace, pool: &mut impl StablePool, c: &mut Counters) {
        if self.dead.is_empty() {
            return;
        }
        let dead = std::mem::take(&mut self.dead);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        space.release_slots(&dead, &mut out);
        out.resize(dead.len(), SlotRelease::Kept);
        let mut freed = Vec::new();
        for (&slot, what) in dead.iter().zip(&out) {
            match what {
                SlotRelease::Freed => {
                    freed.push(slot);
                    c.pool_slots_freed += 1;
                }
                // Its page is gone, but a pool copy still refers to it: the
                // slot is never handed out again (it holds no memory).
                SlotRelease::Retired => {
                    c.pool_slots_freed += 1;
                    c.pool_slots_retired += 1;
                }
                SlotRelease::Kept => self.deferred.push(slot),
            }
        }
        pool.free(&freed);
        self.out = out;
        self.dead = dead;
        self.dead.clear();
    }

    /// Takes the slots kept for a later try (to hand them to a shared tree).
    pub fn take_kept(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.deferred)
    }

    /// Gives memory back (no region left).
    pub fn shrink(&mut self) {
        self.dead.shrink_to_fit();
        self.deferred.shrink_to_fit();
        self.out = Vec::new();
    }
}

/// A boxed pool is a pool.
impl<T: StablePool + ?Sized> StablePool for Box<T> {
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        (**self).alloc(hints, out)
    }
    fn free(&mut self, slots: &[Slot]) {
        (**self).free(slots)
    }
    fn in_use(&self) -> u64 {
        (**self).in_use()
    }
    fn metadata_bytes(&self) -> u64 {
        (**self).metadata_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_give_runs_and_frees_shrink_the_top() {
        let mut p = LocalPool::new(10);
        let mut out = Vec::new();
        p.alloc(&[SlotHint::Any, SlotHint::FollowPrevious, SlotHint::Any], &mut out);
        assert_eq!(out, vec![Some(Slot(0)), Some(Slot(1)), Some(Slot(2))]);
        p.free(&[Slot(1)]);
        assert_eq!(p.in_use(), 2);
        p.alloc(&[SlotHint::Any], &mut out);
        assert_eq!(out, vec![Some(Slot(1))], "freed slots are reused");
        p.free(&[Slot(2), Slot(1), Slot(0)]);
        assert_eq!(p.in_use(), 0);
        p.alloc(&[SlotHint::Exactly(Slot(5)), SlotHint::FollowPrevious], &mut out);
        assert_eq!(out, vec![Some(Slot(0)), Some(Slot(1))], "a hint past the top is no hint");
    }

    #[test]
    fn a_full_pool_says_so() {
        let mut p = LocalPool::new(1);
        let mut out = Vec::new();
        p.alloc(&[SlotHint::Any, SlotHint::FollowPrevious], &mut out);
        assert_eq!(out, vec![Some(Slot(0)), None]);
    }
}
