//! The unstable tree: pages whose checksum held still for one scan, keyed by
//! content hash and thrown away at the end of every full scan (the kernel's
//! `root_unstable_tree`). Entries are candidates only: the page may have
//! changed since it was inserted, which is why a merge compares full contents.

use crate::page::PageRef;
use std::collections::HashMap;

/// The unstable tree.
#[derive(Debug, Default)]
pub struct UnstableIndex {
    /// Pages packed into 8 bytes: region (24 bits) and index (40 bits).
    by_hash: HashMap<u64, u64>,
}

/// A page packed into 8 bytes: region (24 bits) and index (40 bits).
pub(crate) fn pack(p: PageRef) -> u64 {
    debug_assert!(p.region.0 < 1 << 24 && p.index < 1 << 40);
    (p.region.0 as u64) << 40 | p.index
}

/// The page [`pack`] packed.
pub(crate) fn unpack(v: u64) -> PageRef {
    PageRef { region: crate::page::RegionId((v >> 40) as u32), index: v & ((1 << 40) - 1) }
}

impl UnstableIndex {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The kernel's `unstable_tree_search_insert`: the page already filed
    /// under `hash`, removed from the tree, or `None` after filing `page`.
    pub fn search_insert(&mut self, hash: u64, page: PageRef) -> Option<PageRef> {
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Occupied(e) => Some(unpack(e.remove())),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(pack(page));
                None
            }
        }
    }

    /// Files `page` under `hash`, replacing a stale entry.
    pub fn insert(&mut self, hash: u64, page: PageRef) {
        self.by_hash.insert(hash, pack(page));
    }

    /// Discards the tree (end of a full scan). Keeps the allocation.
    pub fn clear(&mut self) {
        self.by_hash.clear();
    }

    /// Discards the tree and its allocation.
    pub fn clear_and_shrink(&mut self) {
        self.by_hash = HashMap::new();
    }

    /// Entries filed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Bytes of memory the tree uses.
    pub fn metadata_bytes(&self) -> u64 {
        (self.by_hash.capacity() * (8 + 8 + 1)) as u64
    }
}
