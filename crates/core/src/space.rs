//! The page space: what the scanner needs from memory, as a trait.
//!
//! The Linux implementation (crate `samepage`, module `sys`) reads pages with
//! volatile copies, learns page states from `PAGEMAP_SCAN`, and merges inside
//! a userfaultfd write-protect window. [`crate::sim::SimPageSpace`] is a
//! deterministic simulation used by the tests and the fuzz target.
//!
//! Every operation that changes what a page maps is *atomic with respect to
//! writers* by contract: a page is replaced by a stable page only if its
//! content equals the stable page's at the moment of replacement, so no write
//! is ever lost.

use crate::page::{PageRef, RegionId, Slot};
use std::ops::Range;
use thiserror::Error;

/// What one page is, as far as the page space can tell cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// The kernel's shared zero page is mapped (untouched memory that was read,
    /// or a zero page the engine placed).
    ZeroPfn,
    /// A stable pool page is mapped and has not been written since.
    Pool,
    /// A private page (its content is read only if the scanner asks, with
    /// [`PageSpace::hash_page`]).
    Private,
    /// A private page inside a mapping of the pool: the program wrote to a
    /// merged page and the kernel's copy-on-write gave it a private copy in
    /// place. Such a page is never replaced: `UFFDIO_MOVE`, the one atomic
    /// check that no device pins a page, works only on anonymous mappings,
    /// so nothing can tell whether a DMA write is on its way into it.
    PoolCopy,
}

/// One sampled page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Page index inside the sampled region.
    pub index: u64,
    /// Its state.
    pub state: PageState,
    /// For a subpage of a transparent huge page: which huge page (a key
    /// equal for the 512 subpages of one, unique within the region).
    pub huge: Option<u64>,
}

/// Where a page should go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Map this stable pool slot in its place, if the contents are equal.
    Slot(Slot),
    /// Map the kernel's zero page in its place, if the page is all zeros.
    Zero,
}

/// A merge the scanner asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intent {
    /// The page to replace.
    pub page: PageRef,
    /// What replaces it.
    pub target: Target,
}

/// What became of one [`Intent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntentResult {
    /// The page now maps the target.
    Merged,
    /// The full compare failed: the page changed (or a hash collided). Nothing changed.
    Mismatch,
    /// Refused to stay inside the VMA budget. Nothing changed.
    OverBudget,
    /// The OS refused (ENOMEM, EPERM, EFAULT...). Nothing changed.
    Failed,
    /// The page is pinned (`FOLL_PIN`: O_DIRECT or io_uring I/O in flight, an
    /// io_uring fixed buffer, VFIO, RDMA) or not exclusively this process's:
    /// replacing it could send a device's write to a page nobody reads, so
    /// it stays as it is (the kernel's `write_protect_page` refuses it too).
    /// Nothing changed.
    Pinned,
}

/// What became of a pool slot the scanner gave up ([`PageSpace::release_slots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRelease {
    /// Its page was freed; the slot may hold a new stable page.
    Freed,
    /// Something outside the engine's knowledge (a forked child) still maps
    /// the page, or may: keep the slot and try again later.
    Kept,
    /// Its page was freed, but a mapping of the pool still refers to the slot
    /// (a private copy made by a write to a merged page): the slot must never
    /// hold another page, or discarding that copy would read it.
    Retired,
}

/// How a range is discarded ([`PageSpace::discard`]), with the kernel's
/// semantics for anonymous memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    /// `MADV_DONTNEED`: the pages read as zeros afterwards.
    DontNeed,
    /// `MADV_FREE`: the pages may keep their content until written, or read
    /// as zeros, at the kernel's choice.
    Free,
    /// `MADV_REMOVE`-like use: free the backing memory; the pages read as zeros.
    Remove,
}

/// A page-space failure the scanner cannot work around.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpaceError {
    /// The region is not known to the page space.
    #[error("region {0:?} is not registered with the page space")]
    UnknownRegion(RegionId),
    /// The stable pool is full.
    #[error("the stable pool has no free slot")]
    PoolFull,
    /// The OS refused an operation.
    #[error("{op} failed: {} (errno {errno})", std::io::Error::from_raw_os_error(*errno))]
    Os {
        /// The operation.
        op: &'static str,
        /// The kernel's error number (`ENOMEM`, `EAGAIN`, `EINVAL`...).
        errno: i32,
    },
}

impl SpaceError {
    /// The kernel's error number, when the OS refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SpaceError::Os { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The memory the scanner works on: registered regions and the stable pool.
///
/// Implementations: `samepage::sys::LinuxPageSpace` (real memory) and
/// [`crate::sim::SimPageSpace`] (tests).
pub trait PageSpace {
    /// Samples pages `[start, end)` of `region`, appending to `out` the present
    /// pages (absent pages are left out) in index order, at most `max_present`
    /// of them. Returns the index where the walk stopped (`end` when complete).
    fn sample(
        &mut self,
        region: RegionId,
        start: u64,
        end: u64,
        max_present: usize,
        out: &mut Vec<Sample>,
    ) -> Result<u64, SpaceError>;

    /// The [`crate::page_hash`] of a page's current content.
    fn hash_page(&mut self, page: PageRef) -> Result<u64, SpaceError>;

    /// Copies the current content of `page` into the empty pool `slot`, and
    /// returns the hash of what was copied (a racing writer can make it differ
    /// from the hash sampled earlier: the scanner then gives the slot back).
    fn fill_slot(&mut self, page: PageRef, slot: Slot) -> Result<u64, SpaceError>;

    /// Carries out `intents` (in any order; consecutive pages going to
    /// consecutive slots should be merged with one operation), writing one
    /// result per intent into `results`. Each merge compares the full contents
    /// while writers are held off, so no write is lost.
    fn merge(&mut self, intents: &[Intent], results: &mut Vec<IntentResult>);

    /// Makes pages private again with their content intact (`MADV_UNMERGEABLE`)
    /// in `range` of `region`: every page there that maps the pool in any way
    /// leaves it. `pages` are the indices in `range` that map a stable page or
    /// a zero page the engine placed, in increasing order.
    fn unmerge(&mut self, region: RegionId, range: Range<u64>, pages: &[u64]) -> Result<(), SpaceError>;

    /// The program takes `range` of `region` back (to `munmap`, `mremap` or
    /// `mprotect` it), after it was unmerged: the page space must never read,
    /// protect or map anything there again.
    fn release_range(&mut self, region: RegionId, range: Range<u64>);

    /// Frees pool slots whose last stable mapping is gone, writing one result
    /// per slot into `out` ([`SlotRelease`]).
    fn release_slots(&mut self, slots: &[Slot], out: &mut Vec<SlotRelease>);

    /// The program discards `range` of `region` (`MADV_DONTNEED`,
    /// `MADV_FREE`, `MADV_REMOVE`): afterwards its pages read as zeros (or,
    /// for [`Discard::Free`], as zeros or their old content), as anonymous
    /// memory would, including pages that map the pool. On an error nothing
    /// changed (the kernel's EINVAL for locked memory, say).
    fn discard(&mut self, region: RegionId, range: Range<u64>, how: Discard) -> Result<(), SpaceError>;

    /// Whether two pool slots hold the same bytes (stable pages never change,
    /// so this needs no window).
    fn slots_equal(&mut self, a: Slot, b: Slot) -> Result<bool, SpaceError>;

    /// Pages the program discarded behind the scanner's back (a plain
    /// `madvise(MADV_DONTNEED)` the page space noticed and served by making
    /// them read zeros), appended to `out` and forgotten by the page space.
    /// The scanner drops their links. The default has none.
    fn drain_discarded(&mut self, out: &mut Vec<PageRef>) {
        let _ = out;
    }
}
