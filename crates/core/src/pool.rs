//! The stable pool's slots: which pool pages are in use.
//!
//! Slots for pages that merge as a run are handed out consecutively (the
//! caller passes the previous slot as a hint), so a run of pages maps a run of
//! slots with one mapping. [`StablePool`] is the interface a pool shared by
//! several processes will implement; [`LocalPool`] is the in-process one.

use crate::page::Slot;
use std::collections::BTreeSet;

/// Slot bookkeeping of the stable pool.
pub trait StablePool {
    /// A free slot: `hint` if it is free, else any. `None` when the pool is full.
    fn alloc(&mut self, hint: Option<Slot>) -> Option<Slot>;
    /// Returns a slot whose page has been freed.
    fn free(&mut self, slot: Slot);
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
}

impl StablePool for LocalPool {
    fn alloc(&mut self, hint: Option<Slot>) -> Option<Slot> {
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

    fn free(&mut self, slot: Slot) {
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

    fn in_use(&self) -> u64 {
        self.bump - self.freed.len() as u64
    }

    fn metadata_bytes(&self) -> u64 {
        (self.freed.len() * 16) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_give_runs_and_frees_shrink_the_top() {
        let mut p = LocalPool::new(10);
        let a = p.alloc(None).unwrap();
        let b = p.alloc(Some(Slot(a.0 + 1))).unwrap();
        assert_eq!((a, b), (Slot(0), Slot(1)));
        let c = p.alloc(None).unwrap();
        p.free(b);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.alloc(None), Some(Slot(1)), "freed slots are reused");
        p.free(c);
        p.free(Slot(1));
        p.free(a);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.alloc(None), Some(Slot(0)));
    }
}
