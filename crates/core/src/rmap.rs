//! rmap items: the per-page record of a scanned page.
//!
//! The kernel allocates a 64-byte `struct ksm_rmap_item` for every page it has
//! visited. samepage keeps an 8-byte [`RmapItem`] in chunks of
//! [`CHUNK_PAGES`] pages, allocated only where pages exist and freed when the
//! chunk empties. Reverse mapping from a stable node to its pages is a count
//! ([`crate::stable::StableNode::rmap_hlist_len`]); the pages themselves are found by
//! walking the tables (defragmentation and unmerge do that, rarely).
//!
//! Zero pages placed with `use_zero_pages` carry no rmap item (as in the
//! kernel since "ksm: support tracking KSM-placed zero-pages", 2023):
//! their link is [`Link::Zero`] and they count neither in `rmap_items` nor in
//! `pages_volatile`.

use crate::page::NodeId;

/// Pages per rmap chunk (one huge page's worth).
pub const CHUNK_PAGES: usize = 512;

const TAG_SHIFT: u32 = 29;
const PAYLOAD: u32 = (1 << TAG_SHIFT) - 1;
const TAG_NONE: u32 = 0;
const TAG_SEEN: u32 = 1;
const TAG_UNSTABLE: u32 = 2;
const TAG_STABLE: u32 = 3;
const TAG_ZERO: u32 = 4;
const TAG_PINNED: u32 = 5;
const TAG_POOL_COPY: u32 = 6;

/// The largest node id an rmap item can hold.
pub const MAX_NODE_ID: u32 = PAYLOAD;

/// Where a page stands in the trees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// No rmap item: never seen, or seen absent.
    None,
    /// An rmap item with a checksum, in no tree (the kernel's volatile page).
    Seen,
    /// In the unstable tree of the current scan (counted in `pages_unshared`).
    Unstable,
    /// Maps this stable node's pool page.
    Stable(NodeId),
    /// Maps the kernel's zero page, placed by the engine (no rmap item).
    Zero,
    /// An rmap item in no tree whose last merge was refused because the page
    /// is pinned or shared ([`crate::IntentResult::Pinned`]): counted in
    /// `pages_pinned`, tried again at later visits (smart_scan backs off).
    Pinned,
    /// An rmap item for a private copy inside a mapping of the pool
    /// ([`crate::PageState::PoolCopy`]): never merged again, counted in
    /// `pages_pool_copies`.
    PoolCopy,
}

/// One page's record: 8 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RmapItem {
    /// The checksum of the page at its previous visit (the kernel's `oldchecksum`).
    pub oldchecksum: u32,
    link: u32,
}

impl RmapItem {
    /// Builds an item.
    pub fn new(oldchecksum: u32, link: Link) -> Self {
        let link = match link {
            Link::None => TAG_NONE << TAG_SHIFT,
            Link::Seen => TAG_SEEN << TAG_SHIFT,
            Link::Unstable => TAG_UNSTABLE << TAG_SHIFT,
            Link::Stable(n) => {
                debug_assert!(n.0 <= PAYLOAD);
                (TAG_STABLE << TAG_SHIFT) | (n.0 & PAYLOAD)
            }
            Link::Zero => TAG_ZERO << TAG_SHIFT,
            Link::Pinned => TAG_PINNED << TAG_SHIFT,
            Link::PoolCopy => TAG_POOL_COPY << TAG_SHIFT,
        };
        RmapItem { oldchecksum, link }
    }

    /// The item's link.
    pub fn link(&self) -> Link {
        match self.link >> TAG_SHIFT {
            TAG_SEEN => Link::Seen,
            TAG_UNSTABLE => Link::Unstable,
            TAG_STABLE => Link::Stable(NodeId(self.link & PAYLOAD)),
            TAG_ZERO => Link::Zero,
            TAG_PINNED => Link::Pinned,
            TAG_POOL_COPY => Link::PoolCopy,
            _ => Link::None,
        }
    }

    /// smart_scan's age of a page in no tree, the unstable tree, or refused
    /// as pinned: how many times it was visited without merging (saturating
    /// at 255).
    pub fn age(&self) -> u8 {
        (self.age_bits() & 0xff) as u8
    }

    /// smart_scan's visits still to skip.
    pub fn remaining_skips(&self) -> u8 {
        (self.age_bits() >> 8 & 0xff) as u8
    }

    /// The item with smart_scan's age and skips set (only [`Link::Seen`],
    /// [`Link::Unstable`] and [`Link::Pinned`] items keep them; other links
    /// have no room).
    pub fn with_age(self, age: u8, remaining_skips: u8) -> Self {
        match self.link() {
            Link::Seen | Link::Unstable | Link::Pinned => RmapItem {
                oldchecksum: self.oldchecksum,
                link: (self.link & !PAYLOAD) | age as u32 | (remaining_skips as u32) << 8,
            },
            _ => self,
        }
    }

    pub(crate) fn age_bits(&self) -> u32 {
        match self.link() {
            Link::Seen | Link::Unstable | Link::Pinned => self.link & PAYLOAD,
            _ => 0,
        }
    }

    /// Whether this counts as an rmap item (the kernel's `ksm_rmap_items`).
    pub fn is_rmap_item(&self) -> bool {
        matches!(self.link(), Link::Seen | Link::Unstable | Link::Stable(_) | Link::Pinned | Link::PoolCopy)
    }
}

type Chunk = Box<[RmapItem; CHUNK_PAGES]>;

/// The rmap items of one region.
#[derive(Debug, Default)]
pub struct RmapTable {
    chunks: Vec<Option<Chunk>>,
    live: Vec<u16>,
    npages: u64,
    allocated: usize,
}

impl RmapTable {
    /// A table for a region of `npages` pages; allocates nothing per page yet.
    pub fn new(npages: u64) -> Self {
        let nchunks = npages.div_ceil(CHUNK_PAGES as u64) as usize;
        RmapTable { chunks: (0..nchunks).map(|_| None).collect(), live: vec![0; nchunks], npages, allocated: 0 }
    }

    /// Pages covered.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// The item of page `index` (an empty item where none exists).
    pub fn get(&self, index: u64) -> RmapItem {
        let (c, o) = split(index);
        match self.chunks.get(c) {
            Some(Some(chunk)) => chunk[o],
            _ => RmapItem::default(),
        }
    }

    /// Stores the item of page `index`, allocating or freeing its chunk.
    pub fn set(&mut self, index: u64, item: RmapItem) {
        let (c, o) = split(index);
        let empty = item.link() == Link::None;
        if self.chunks[c].is_none() {
            if empty {
                return;
            }
            self.chunks[c] = Some(Box::new([RmapItem::default(); CHUNK_PAGES]));
            self.allocated += 1;
        }
        let chunk = self.chunks[c].as_mut().expect("chunk allocated above");
        let was_empty = chunk[o].link() == Link::None;
        chunk[o] = item;
        match (was_empty, empty) {
            (true, false) => self.live[c] += 1,
            (false, true) => {
                self.live[c] -= 1;
                if self.live[c] == 0 {
                    self.chunks[c] = None;
                    self.allocated -= 1;
                }
            }
            _ => {}
        }
    }

    /// Indices in `[start, end)` whose link is not [`Link::None`], in order.
    pub fn linked_in(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, RmapItem)> + '_ {
        let end = end.min(self.npages);
        let first_chunk = (start / CHUNK_PAGES as u64) as usize;
        let last_chunk = end.div_ceil(CHUNK_PAGES as u64) as usize;
        (first_chunk..last_chunk).filter_map(move |c| self.chunks[c].as_ref().map(|ch| (c, ch))).flat_map(
            move |(c, ch)| {
                let base = (c * CHUNK_PAGES) as u64;
                ch.iter()
                    .enumerate()
                    .map(move |(o, it)| (base + o as u64, *it))
                    .filter(move |(i, it)| *i >= start && *i < end && it.link() != Link::None)
            },
        )
    }

    /// Bytes allocated for items.
    pub fn metadata_bytes(&self) -> u64 {
        (self.allocated * std::mem::size_of::<[RmapItem; CHUNK_PAGES]>()
            + self.chunks.capacity() * std::mem::size_of::<Option<Chunk>>()
            + self.live.capacity() * 2) as u64
    }
}

fn split(index: u64) -> (usize, usize) {
    ((index / CHUNK_PAGES as u64) as usize, (index % CHUNK_PAGES as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_is_eight_bytes_and_round_trips() {
        assert_eq!(std::mem::size_of::<RmapItem>(), 8);
        for link in [
            Link::None,
            Link::Seen,
            Link::Unstable,
            Link::Zero,
            Link::Pinned,
            Link::PoolCopy,
            Link::Stable(NodeId(0)),
            Link::Stable(NodeId(MAX_NODE_ID)),
        ] {
            assert_eq!(RmapItem::new(7, link).link(), link);
        }
    }

    #[test]
    fn age_lives_beside_the_link() {
        let it = RmapItem::new(5, Link::Seen).with_age(7, 3);
        assert_eq!((it.link(), it.age(), it.remaining_skips(), it.oldchecksum), (Link::Seen, 7, 3, 5));
        let st = RmapItem::new(5, Link::Stable(NodeId(9))).with_age(7, 3);
        assert_eq!((st.link(), st.age()), (Link::Stable(NodeId(9)), 0));
    }

    #[test]
    fn chunks_come_and_go() {
        let mut t = RmapTable::new(2000);
        let base = t.metadata_bytes();
        t.set(1500, RmapItem::new(1, Link::Seen));
        assert!(t.metadata_bytes() >= base + 4096);
        assert_eq!(t.linked_in(0, 2000).map(|(i, _)| i).collect::<Vec<_>>(), vec![1500]);
        t.set(1500, RmapItem::default());
        assert_eq!(t.metadata_bytes(), base);
        assert_eq!(t.linked_in(0, 2000).count(), 0);
    }
}
