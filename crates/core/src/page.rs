//! Pages, regions, pool slots and the content hash.

use std::sync::OnceLock;

/// The page size samepage works in (x86_64 base pages).
pub const PAGE_SIZE: usize = 4096;

/// Subpages of a transparent huge page (a PMD-mapped folio on x86_64).
pub const HUGE_PAGE_SUBPAGES: u64 = 512;

/// The size of a transparent huge page: 2 MiB.
pub const HUGE_PAGE_SIZE: usize = PAGE_SIZE * HUGE_PAGE_SUBPAGES as usize;

/// Identifies a registered region (the engine's `mm_slot`/VMA analogue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RegionId(pub u32);

impl RegionId {
    /// The largest region id: ids take 24 bits where a page is packed into
    /// 8 bytes ([`PageRef::pack`]).
    pub const MAX: u32 = (1 << 24) - 1;
}

/// A stable node's id (the kernel's `struct ksm_stable_node`, named by
/// index): what an rmap item of a merged page links to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NodeId(pub u32);

/// A trust domain: pages of different domains never merge (merging is a
/// timing side channel: a write to a merged page is slower, which tells the
/// writer that someone else holds the same content). Domain 0 is the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Domain(pub u32);

impl Domain {
    /// The index key of content `hash` in this domain: the hash itself in
    /// domain 0, a domain-specific mix otherwise. Keys only sort candidates:
    /// the scanner also checks the domain before any merge.
    pub fn key(self, hash: u64) -> u64 {
        if self.0 == 0 {
            hash
        } else {
            hash ^ (self.0 as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
        }
    }
}

/// One page: a region and the page's index inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PageRef {
    /// The region.
    pub region: RegionId,
    /// Page index from the region's start.
    pub index: u64,
}

impl PageRef {
    /// The page packed into 8 bytes: region (24 bits, at most
    /// [`RegionId::MAX`]) and index (40 bits).
    pub fn pack(self) -> u64 {
        debug_assert!(self.region.0 <= RegionId::MAX && self.index < 1 << 40);
        (self.region.0 as u64) << 40 | self.index
    }

    /// The page [`PageRef::pack`] packed.
    pub fn unpack(v: u64) -> PageRef {
        PageRef { region: RegionId((v >> 40) as u32), index: v & ((1 << 40) - 1) }
    }
}

/// A page-sized slot of the stable pool (the file offset divided by the page size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Slot(pub u64);

/// The content hash of one page: 64-bit xxh3 (SIMD on x86_64).
///
/// It keys the stable and unstable indexes; its low 32 bits serve as the
/// page's checksum for volatility (the kernel's `calc_checksum`).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The hash of a page of zeros.
pub fn zero_page_hash() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

/// The checksum stored in an rmap item (the kernel keeps 32 bits too).
pub(crate) fn checksum_of(hash: u64) -> u32 {
    hash as u32
}
