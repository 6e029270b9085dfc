//! [`LinuxPageSpace`]: the core's page space on this process's real memory.
//!
//! **A merge** (the kernel's `try_to_merge_one_page`: `write_protect_page`
//! then `replace_page`), for a window of nearby pages the scanner wants
//! merged:
//!
//! 1. register the window `UFFDIO_REGISTER_MODE_MISSING` with the engine's
//!    userfaultfd: from now on a thread (or the kernel for it) touching a
//!    page that is not there waits instead of faulting in a zero page;
//! 2. move each run of candidate pages into the engine's scratch area with
//!    one `UFFDIO_MOVE`. The kernel refuses (`EBUSY`) a page that a device
//!    pins or that another process shares, atomically with the move: such a
//!    page stays where it is. A writer now finds no page and waits;
//! 3. compare each moved page with its target (pool slot or zeros), in full,
//!    where nobody else can write it;
//! 4. map each run of equal pages' pool slots over them with one
//!    `mmap(MAP_FIXED)` (empty pages need nothing: the range reads zeros),
//!    and put back the attributes the program gave that memory
//!    ([`super::attrs::Keep`]);
//! 5. move the other pages back;
//! 6. unregister and wake the window: waiting threads retry and find the
//!    pool page (a write gets a private copy by the kernel's copy-on-write)
//!    or their own page back. No read sees a page that is not the program's,
//!    and no write, by a thread or a device, is lost;
//! 7. free the duplicates left in the scratch area.
//!
//! A page refused in step 2 gets one write fault (`MADV_POPULATE_WRITE`, no
//! content change) that makes a page once shared with a forked child this
//! process's own, and one more try; if the kernel still refuses, it is
//! pinned ([`IntentResult::Pinned`]).
//!
//! **Pool copies.** A write to a merged page gets a private copy inside the
//! pool mapping (the kernel's copy-on-write). `UFFDIO_MOVE` cannot take a
//! page out of a file mapping, so nothing can tell whether a device pins such
//! a copy: the engine never replaces one ([`PageState::PoolCopy`]). Pages
//! that still map their pool page can be pinned only for reading (a pin for
//! writing copies the page first), so moving them to another pool slot
//! (defragmentation) or to a private copy (unmerging) loses nothing; that
//! happens under write protection (`UFFDIO_WRITEPROTECT`), with the pool
//! copies found after the protection is set left in place. A pool copy
//! keeps its slot's file offset in its mapping, so such a slot is
//! [`SlotRelease::Retired`] rather than reused: discarding the copy later
//! reads the hole, zeros, and never another page.

use super::addr::{PageAddr, PageRange};
use super::attrs::{self, Exclusion, Keep};
use super::breaker::Breaker;
use super::fault::{self, Point};
use super::mem::{self, PageBuf};
use super::pagemap::{self, Category, PageMap};
use super::pool::MemfdPool;
use super::uffd::{RegisterMode, Uffd, UffdMode};
use super::vma::VmaBudget;
use super::SysError;
use rustix::io::Errno;
use samepage_core::{
    page_hash, Discard, Intent, IntentResult, PageRef, PageSpace, PageState, RegionId, Sample, Slot, SlotRelease,
    SpaceError, Target, PAGE_SIZE,
};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

/// Pages closer than this share one window.
const WINDOW_GAP: u64 = 16;

/// Pages of a scratch area: the most pages one window moves out.
const SCRATCH_PAGES: usize = 4096;

/// Pages of the scratch area for locked memory (`UFFDIO_MOVE` wants both
/// ends equally locked): small, since locking it counts in the process's
/// `VmLck` against `RLIMIT_MEMLOCK` whether its pages are there or not.
const LOCKED_SCRATCH_PAGES: usize = 64;

/// Pages per chunk of a region's [`PoolSlots`].
const CHUNK: u64 = 512;

/// A pool copy that may be pinned: made by the kernel's copy-on-write while
/// its pool page was not write-protected (in the moment between mapping a
/// pool run and protecting it, or after the breaker gave up on a write). The
/// breaker never moves such a page; it stays a pool copy.
const TAINTED: u32 = 1 << 31;

/// Which pool slot each page of a region maps (merged pages, and pool
/// copies made by writes to them), in chunks allocated where merges happen.
#[derive(Debug, Default)]
struct PoolSlots {
    chunks: Vec<Option<Box<[u32; CHUNK as usize]>>>,
    live: Vec<u16>,
}

impl PoolSlots {
    fn new(npages: u64) -> Self {
        let n = npages.div_ceil(CHUNK) as usize;
        PoolSlots { chunks: (0..n).map(|_| None).collect(), live: vec![0; n] }
    }

    fn get(&self, i: u64) -> Option<Slot> {
        let c = self.chunks[(i / CHUNK) as usize].as_ref()?;
        match c[(i % CHUNK) as usize] & !TAINTED {
            0 => None,
            s => Some(Slot(u64::from(s) - 1)),
        }
    }

    /// Whether page `i` is a pool copy that may be pinned ([`TAINTED`]).
    fn tainted(&self, i: u64) -> bool {
        self.chunks[(i / CHUNK) as usize].as_ref().is_some_and(|c| c[(i % CHUNK) as usize] & TAINTED != 0)
    }

    /// Marks page `i` (in a pool mapping) as a pool copy that may be pinned.
    fn taint(&mut self, i: u64) {
        if let Some(c) = self.chunks[(i / CHUNK) as usize].as_mut() {
            if c[(i % CHUNK) as usize] != 0 {
                c[(i % CHUNK) as usize] |= TAINTED;
            }
        }
    }

    fn set(&mut self, i: u64, slot: Option<Slot>) {
        let (c, o) = ((i / CHUNK) as usize, (i % CHUNK) as usize);
        if self.chunks[c].is_none() {
            if slot.is_none() {
                return;
            }
            self.chunks[c] = Some(Box::new([0; CHUNK as usize]));
        }
        let chunk = self.chunks[c].as_mut().expect("allocated above");
        let v = slot.map_or(0, |s| {
            u32::try_from(s.0 + 1).ok().filter(|v| v & TAINTED == 0).expect("pool slots fit in 31 bits")
        });
        match (chunk[o] == 0, v == 0) {
            (true, false) => self.live[c] += 1,
            (false, true) => self.live[c] -= 1,
            _ => {}
        }
        chunk[o] = v;
        if self.live[c] == 0 {
            self.chunks[c] = None;
        }
    }

    /// Whether any page in `from..to` is in a pool mapping.
    fn any_in(&self, from: u64, to: u64) -> bool {
        (from..to).any(|i| self.chunks[(i / CHUNK) as usize].is_some() && self.get(i).is_some())
    }

    fn bytes(&self) -> u64 {
        (self.chunks.iter().flatten().count() * CHUNK as usize * 4
            + self.chunks.capacity() * 8
            + self.live.capacity() * 2) as u64
    }
}

/// A stretch of a region with one set of attributes.
#[derive(Clone, Debug)]
struct Segment {
    pages: Range<u64>,
    keep: Keep,
    excluded: Option<Exclusion>,
}

#[derive(Debug)]
struct RegionMap {
    base: PageAddr,
    npages: u64,
    slots: PoolSlots,
    /// Page ranges the program took back, sorted and disjoint: never touched.
    released: Vec<Range<u64>>,
    /// The region's attributes, sorted, covering it.
    segments: Vec<Segment>,
}

impl RegionMap {
    fn addr(&self, index: u64) -> PageAddr {
        self.base.add_pages(index as usize)
    }

    fn range(&self, pages: Range<u64>) -> PageRange {
        PageRange::new(self.addr(pages.start), (pages.end - pages.start) as usize)
    }

    /// The region's page ranges minus the released ones.
    fn pieces(&self, within: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::with_capacity(self.released.len() + 1);
        let mut pos = within.start;
        for r in &self.released {
            if r.end <= pos || r.start >= within.end {
                continue;
            }
            if r.start > pos {
                out.push(pos..r.start);
            }
            pos = pos.max(r.end);
        }
        if pos < within.end {
            out.push(pos..within.end);
        }
        out
    }

    /// The runs of pages in pool mappings (merged, or copied since) within
    /// the live part of `within`: consecutive pages with the same
    /// attributes, at most `max` pages a run.
    fn pool_runs(&self, within: Range<u64>, max: u64) -> Vec<(Range<u64>, Keep)> {
        let mut runs = Vec::new();
        for piece in self.pieces(within) {
            let mut i = piece.start;
            while i < piece.end {
                if self.slots.get(i).is_none() {
                    i += 1;
                    continue;
                }
                let (from, keep) = (i, self.segment(i).keep);
                while i < piece.end && self.slots.get(i).is_some() && self.segment(i).keep == keep && i - from < max {
                    i += 1;
                }
                runs.push((from..i, keep));
            }
        }
        runs
    }

    /// Whether a released range meets pages `a..=b`.
    fn released_between(&self, a: u64, b: u64) -> bool {
        self.released.iter().any(|r| r.start <= b && a < r.end)
    }

    fn segment(&self, i: u64) -> &Segment {
        let k = self.segments.partition_point(|s| s.pages.end <= i);
        &self.segments[k.min(self.segments.len() - 1)]
    }

    fn excluded(&self, i: u64) -> bool {
        self.segment(i).excluded.is_some()
    }
}

/// System calls made, for benchmarks and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// `UFFDIO_MOVE` calls (pages out of a window, and back).
    pub moves: u64,
    /// Pages a failing `UFFDIO_MOVE` moved without counting them in its
    /// answer, found in the page tables (see `move_window`).
    pub uncounted_moves: u64,
    /// Pages moved out to be merged.
    pub pages_moved: u64,
    /// Windows opened (`UFFDIO_REGISTER` + `UFFDIO_UNREGISTER` pairs).
    pub windows: u64,
    /// `UFFDIO_WRITEPROTECT` calls (refiles and unmerges).
    pub write_protects: u64,
    /// `mmap` calls mapping pool runs.
    pub pool_maps: u64,
    /// Pages given one write fault to make them this process's own again
    /// after `UFFDIO_MOVE` refused them.
    pub unshares: u64,
    /// `PAGEMAP_SCAN` (or pagemap read) calls.
    pub pagemap_scans: u64,
    /// Pages hashed.
    pub pages_hashed: u64,
    /// Writes to merged pages the copy-on-write breaker served by moving the
    /// page into anonymous memory (where it can merge again).
    pub cow_breaks: u64,
    /// Writes to merged pages it could not serve (no memory, or no mapping
    /// left under the VMA budget): they got the kernel's copy-on-write in
    /// place and became pool copies.
    pub cow_fallbacks: u64,
    /// The program's own `madvise(MADV_DONTNEED/FREE/REMOVE)` calls on
    /// merged pages that the engine noticed and made read zeros.
    pub plain_discards: u64,
}

/// The engine's scratch area: where a window's pages wait while they are
/// compared. Registered with the userfaultfd (`UFFDIO_MOVE` needs its
/// destination registered), never touched by anyone else, not inherited.
#[derive(Clone, Copy, Debug)]
struct Scratch {
    range: PageRange,
    locked: bool,
}

impl Scratch {
    fn new(uffd: &Uffd, locked: bool) -> Result<Scratch, SysError> {
        let range = mem::map_anon_noreserve(if locked { LOCKED_SCRATCH_PAGES } else { SCRATCH_PAGES })?;
        let made = (|| {
            mem::advise(range, mem::Hint::NoHugePage)?;
            mem::advise(range, mem::Hint::DontFork)?;
            if locked {
                // UFFDIO_MOVE wants both ends equally locked.
                mem::lock_on_fault(range)?;
            }
            uffd.register(range, RegisterMode::MISSING)
        })();
        if let Err(e) = made {
            // SAFETY: our own fresh mapping, unused.
            let _ = unsafe { mem::unmap(range) };
            return Err(e);
        }
        Ok(Scratch { range, locked })
    }

    /// Frees the first `used` pages.
    fn clear(&self, used: usize) {
        if used == 0 {
            return;
        }
        let r = self.range.sub(0, used);
        if self.locked {
            // MADV_DONTNEED refuses locked memory.
            let _ = mem::unlock(r);
            // SAFETY: scratch pages hold only duplicates the engine merged away.
            let _ = unsafe { mem::dont_need(r) };
            let _ = mem::lock_on_fault(r);
        } else {
            // SAFETY: as above.
            let _ = unsafe { mem::dont_need(r) };
        }
    }
}

/// What the page space shares with its copy-on-write breaker
/// ([`super::breaker`]): which pages map the pool, the VMA budget, and the
/// ranges whose pool mappings the page space is replacing right now.
#[derive(Debug)]
pub struct Registry {
    regions: HashMap<RegionId, RegionMap>,
    /// Pages in pool mappings (merged pages, and pool copies, in any region
    /// or left behind by one) per slot: a slot some mapping refers to is never
    /// handed out again.
    slot_refs: HashMap<Slot, u32>,
    budget: VmaBudget,
    /// Ranges whose pool mappings the page space is replacing: the breaker
    /// leaves a write fault there waiting; the page space wakes it after.
    /// The registry stays exact meanwhile (every replacement is made and
    /// recorded under its lock), so a discard there is served at once.
    busy: Vec<PageRange>,
    /// Merged pages the breaker moved into anonymous memory on a write.
    cow_breaks: u64,
    /// Writes to merged pages the breaker could not serve (no memory, no
    /// mapping left under the VMA budget): those got the kernel's
    /// copy-on-write in place and are pool copies.
    cow_fallbacks: u64,
    /// Merged pages the program discarded with a plain `madvise` (noticed by
    /// the breaker), made anonymous zeros; the scanner drops their links.
    discarded: Vec<PageRef>,
    /// `madvise` calls of the program on merged pages the breaker noticed.
    plain_discards: u64,
    /// Regions whose attributes changed behind the engine's back, as a merge
    /// found (`UFFDIO_MOVE` refusing a page for its lock state or protection
    /// key, `mmap` refusing sealed memory): to be read again.
    stale: HashSet<RegionId>,
}

impl Registry {
    /// Makes the pool mappings in `[start, end)` (any region) fresh
    /// anonymous memory, which reads zeros, with the attributes the program
    /// gave that memory: what `MADV_DONTNEED` does to anonymous memory, and
    /// what it does not do to a private file mapping (which would read its
    /// pool page again). Returns the pages made anonymous (for the scanner
    /// to forget).
    fn zero_pool_pieces(&mut self, start: usize, end: usize) -> Result<Vec<PageRef>, SysError> {
        let mut out = Vec::new();
        let ids: Vec<RegionId> = self.regions.keys().copied().collect();
        for id in ids {
            let r = &self.regions[&id];
            let (rs, re) = (r.base.get(), r.addr(r.npages).get());
            if end <= rs || re <= start {
                continue;
            }
            let from = ((start.max(rs) - rs) / PAGE_SIZE) as u64;
            let to = (end.min(re) - rs).div_ceil(PAGE_SIZE) as u64;
            for (run, keep) in r.pool_runs(from..to, u64::MAX) {
                let r = &self.regions[&id];
                let span = r.range(run.clone());
                // SAFETY: the program discards this range: its content may go.
                unsafe { place(span, Backing::Anon, keep) }?;
                self.budget.spent(2);
                let rm = self.regions.get_mut(&id).expect("region");
                for i in run {
                    if let Some(s) = rm.slots.get(i) {
                        rm.slots.set(i, None);
                        release_ref(&mut self.slot_refs, s);
                    }
                    out.push(PageRef { region: id, index: i });
                }
            }
        }
        Ok(out)
    }

    /// Serves the program's `madvise(MADV_DONTNEED/FREE/REMOVE)` of
    /// `[start, end)` before the kernel discards it (see [`super::breaker`]).
    pub(super) fn noticed_discard(&mut self, start: usize, end: usize) {
        if let Ok(pages) = self.zero_pool_pieces(start, end) {
            if !pages.is_empty() {
                self.plain_discards += 1;
            }
            self.discarded.extend(pages);
        }
    }

    /// Whether the page space is replacing pool mappings at `addr`.
    pub(super) fn is_busy(&self, addr: PageAddr) -> bool {
        self.busy.iter().any(|r| r.contains(addr.get()))
    }

    fn region_at(&self, addr: PageAddr) -> Option<(RegionId, u64)> {
        self.regions.iter().find_map(|(id, r)| {
            let end = r.addr(r.npages);
            (r.base <= addr && addr < end).then(|| (*id, addr.pages_since(r.base) as u64))
        })
    }

    /// Serves a write to a write-protected page at `addr` (see
    /// [`super::breaker`]): if it is a merged page, copies it into fresh
    /// anonymous memory moved over it. Returns false when the page should
    /// just lose its protection instead (not a page the engine merged, or
    /// no memory for the copy), true when done or when the page space is
    /// replacing that range (it wakes the writer itself).
    pub(super) fn break_cow(&mut self, uffd: &Uffd, addr: PageAddr) -> Broken {
        if self.is_busy(addr) {
            return Broken::Busy;
        }
        let Some((id, index)) = self.region_at(addr) else { return Broken::NotMerged };
        let r = &self.regions[&id];
        let Some(slot) = r.slots.get(index) else { return Broken::NotMerged };
        if r.slots.tainted(index) {
            // A pool copy that may be pinned: never replaced.
            return Broken::PoolCopy;
        }
        let keep = r.segment(index).keep;
        let page = PageRange::new(addr, 1);
        if !self.budget.allows(2) {
            self.cow_fallbacks += 1;
            self.regions.get_mut(&id).expect("found above").slots.taint(index);
            return Broken::PoolCopy;
        }
        let moved = (|| {
            // The fault may be an old one, the page's protection lifted since
            // (by a window over it): protect it again before copying, so no
            // write lands in it meanwhile.
            uffd.write_protect(page, true)?;
            let tmp = mem::map_anon(1)?;
            // SAFETY: the page is write-protected and maps the pool (or holds
            // a copy the kernel made in place for a waiting write, not yet
            // written, and not pinned for writing: a pin for writing faults
            // on the protection and waits): it holds still; `tmp` is ours.
            unsafe { std::ptr::copy_nonoverlapping(addr.ptr().cast_const(), tmp.start().ptr(), PAGE_SIZE) };
            // The attributes go on first: the move carries them over (see
            // `place`). SAFETY: `tmp` is ours; the page holds the same bytes
            // and no write pin.
            if let Err(e) = put_back(tmp, keep).and_then(|()| unsafe { mem::move_mapping(tmp, addr) }) {
                // SAFETY: still ours.
                let _ = unsafe { mem::unmap(tmp) };
                return Err(e);
            }
            Ok(())
        })();
        match moved {
            Ok(()) => {}
            // An event waits to be read (by the caller of this): later.
            Err(e) if e.errno == Errno::AGAIN => return Broken::Later,
            Err(_) => {
                self.cow_fallbacks += 1;
                self.regions.get_mut(&id).expect("found above").slots.taint(index);
                return Broken::PoolCopy;
            }
        }
        self.budget.spent(2);
        self.regions.get_mut(&id).expect("found above").slots.set(index, None);
        release_ref(&mut self.slot_refs, slot);
        self.cow_breaks += 1;
        Broken::Moved
    }
}

/// What the breaker did with a write fault ([`Registry::break_cow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Broken {
    /// The merged page was moved into anonymous memory: wake the writer.
    Moved,
    /// The page space is replacing that range: it wakes the writer after.
    Busy,
    /// A pool copy (or a page the breaker could not move): lift the
    /// protection, the kernel copies in place, the page stays a pool copy.
    PoolCopy,
    /// Not a page the engine merged: lift the protection.
    NotMerged,
    /// An event waits to be read first: try again after reading it.
    Later,
}

/// Marks a range busy in the registry until dropped (then wakes it).
struct Busy<'a> {
    registry: &'a Mutex<Registry>,
    uffd: &'a Uffd,
    range: PageRange,
}

impl<'a> Busy<'a> {
    fn new(registry: &'a Mutex<Registry>, uffd: &'a Uffd, range: PageRange) -> Self {
        lock(registry).busy.push(range);
        Busy { registry, uffd, range }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut reg = lock(self.registry);
        if let Some(p) = reg.busy.iter().position(|r| *r == self.range) {
            reg.busy.swap_remove(p);
        }
        drop(reg);
        let _ = self.uffd.wake(self.range);
    }
}

fn lock(m: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A region read from `/proc`, ready to add ([`LinuxPageSpace::prepare_region`]).
#[derive(Debug)]
pub struct PreparedRegion(RegionMap);

/// The page space of this process.
#[derive(Debug)]
pub struct LinuxPageSpace {
    registry: Arc<Mutex<Registry>>,
    /// The scratch areas' userfaultfd (`UFFDIO_MOVE` out of a window needs
    /// its destination registered); it asks for no events, so the engine's
    /// own `MADV_DONTNEED` of scratch pages never waits on a reader.
    uffd: Arc<Uffd>,
    /// The merge windows' userfaultfd (`MISSING` windows, `UFFDIO_MOVE` back,
    /// wake-ups), with remove events: a `madvise(MADV_DONTNEED)` by the
    /// program on a window waits until the page space has read it
    /// ([`LinuxPageSpace::serve_window_events`]).
    window_uffd: Arc<Uffd>,
    /// Looks at the program's discarding `madvise` calls in progress.
    peeker: super::breaker::Peeker,
    /// Faults waiting on the merge windows' userfaultfd.
    window_pending: super::breaker::PendingFaults,
    /// The pool mappings' userfaultfd (full mode: write protection, served by
    /// the breaker, and remove events); the merge windows' one without it.
    pool_uffd: Arc<Uffd>,
    pool: MemfdPool,
    pagemap: PageMap,
    buf: Box<PageBuf>,
    /// A shared pool slot's copy (see `MemfdPool::slot_equals`).
    slot_buf: Box<PageBuf>,
    runs: Vec<pagemap::Run>,
    order: Vec<usize>,
    stats: SpaceStats,
    scratch: Scratch,
    scratch_locked: Option<Scratch>,
    /// Pool mappings stay write-protected and the breaker serves writes to
    /// them (full-mode userfaultfd); without it, a write copies the page in
    /// place and it becomes a pool copy.
    breaker: Option<Breaker>,
    /// For a shared pool, the processes that may map it (unknown at first:
    /// then no page is freed).
    pool_users: Option<Vec<u32>>,
}

impl Drop for LinuxPageSpace {
    fn drop(&mut self) {
        // Registrations go with the userfaultfd when its last holder (the
        // breaker's thread) lets go: the kernel then lifts every protection
        // and wakes every waiter, so merged pages stay ordinary mappings.
        self.breaker = None;
    }
}

impl LinuxPageSpace {
    /// Opens the userfaultfd, `/proc/self/pagemap`, a pool of `pool_slots`
    /// pages and the scratch area, and starts the copy-on-write breaker
    /// (full-mode userfaultfd only). `vma_share` is the share of the
    /// `vm.max_map_count` headroom the engine may use.
    pub fn new(pool_slots: u64, vma_share: f64) -> Result<Self, SysError> {
        Self::with_options(MemfdPool::new(pool_slots)?, vma_share, true)
    }

    /// As [`LinuxPageSpace::new`], on a pool memfd of `pool_slots` pages
    /// shared with other processes (a daemon's partition); see
    /// `release_shared_slots` for when a page of it is freed, and
    /// [`LinuxPageSpace::set_pool_users`].
    pub fn with_shared_pool(fd: rustix::fd::OwnedFd, pool_slots: u64, vma_share: f64) -> Result<Self, SysError> {
        Self::with_options(MemfdPool::from_fd(fd, pool_slots)?, vma_share, true)
    }

    /// As [`LinuxPageSpace::new`] on `pool`; `break_cow = false` leaves
    /// writes to merged pages to the kernel's copy-on-write in place (pool
    /// copies).
    pub fn with_options(pool: MemfdPool, vma_share: f64, break_cow: bool) -> Result<Self, SysError> {
        let uffd = Arc::new(Uffd::open()?);
        let window_uffd = match Uffd::open_with(true) {
            Ok(u) if u.mode() == uffd.mode() => Arc::new(u),
            _ => uffd.clone(),
        };
        let scratch = Scratch::new(&uffd, false)?;
        let registry = Arc::new(Mutex::new(Registry {
            regions: HashMap::new(),
            slot_refs: HashMap::new(),
            budget: VmaBudget::new(vma_share),
            busy: Vec::new(),
            cow_breaks: 0,
            cow_fallbacks: 0,
            discarded: Vec::new(),
            plain_discards: 0,
            stale: HashSet::new(),
        }));
        let (pool_uffd, breaker) = if break_cow && uffd.mode() == UffdMode::Full {
            let pool_uffd = Arc::new(Uffd::open_with(true)?);
            let b = Breaker::start(pool_uffd.clone(), registry.clone())
                .map_err(|e| SysError::new("spawn(samepage-cow)", Errno::from_io_error(&e).unwrap_or(Errno::AGAIN)))?;
            (pool_uffd, Some(b))
        } else {
            (uffd.clone(), None)
        };
        Ok(LinuxPageSpace {
            registry,
            uffd,
            window_pending: super::breaker::PendingFaults::new(&window_uffd),
            peeker: super::breaker::Peeker::new(),
            window_uffd,
            pool_uffd,
            pool,
            pagemap: PageMap::open()?,
            buf: PageBuf::new(),
            slot_buf: PageBuf::new(),
            runs: Vec::new(),
            order: Vec::new(),
            stats: SpaceStats::default(),
            scratch,
            scratch_locked: None,
            breaker,
            pool_users: None,
        })
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// The processes that may map a shared pool (the daemon's clients of
    /// its partition), as the daemon last said.
    pub fn set_pool_users(&mut self, pids: Vec<u32>) {
        self.pool_users = Some(pids);
    }

    /// Maps merged pages from another daemon's partition from now on (the
    /// daemon went away and a new one answered): `fd` of `pool_slots`
    /// pages replaces the pool. Refused with `EBUSY` while any registered
    /// page still maps the old pool, merged or copied (unmerge everything
    /// first); the old pool's view goes, and its pages with the last
    /// process holding it.
    pub fn replace_shared_pool(&mut self, fd: rustix::fd::OwnedFd, pool_slots: u64) -> Result<(), SysError> {
        // Private copies inside mappings of the old pool (pages the kernel
        // copied in place, where the breaker could not serve the write)
        // become anonymous memory too: a pool mapping left behind would
        // hold the old memfd.
        let runs: Vec<(RegionId, PageAddr, Keep, Range<u64>)> = {
            let reg = lock(&self.registry);
            let per_region =
                reg.regions.iter().map(|(&id, r)| (id, r.base, r.pool_runs(0..r.npages, SCRATCH_PAGES as u64)));
            per_region
                .flat_map(|(id, base, runs)| runs.into_iter().map(move |(run, keep)| (id, base, keep, run)))
                .collect()
        };
        for (id, base, keep, run) in runs {
            self.unmerge_pool_run(id, base, keep, run, true)?;
        }
        {
            let reg = lock(&self.registry);
            let mapped = !reg.slot_refs.is_empty()
                || reg.regions.values().any(|r| (0..r.npages).any(|i| r.slots.get(i).is_some()));
            if mapped {
                return Err(SysError::new("replace the pool while pages map it", Errno::BUSY));
            }
        }
        self.pool = MemfdPool::from_fd(fd, pool_slots)?;
        self.pool_users = None;
        Ok(())
    }

    /// [`PageSpace::release_slots`] for a pool shared with other processes.
    /// A page is freed only when no process but the partition's clients
    /// maps the pool (`/proc`: a client's forked child maps it without
    /// page-table entries the mapcount would show) and the page's mapcount,
    /// seen through this process's view, is the view's alone: the clients'
    /// own mappings of the page are the ones the daemon counts, all given
    /// back. Views touch pages to compare them: each process drops its
    /// view's entries around its checks so others' see real mappers only.
    /// A freed slot is retired, never handed out again: another process's
    /// pool copy may still refer to it.
    fn release_shared_slots(&mut self, slots: &[Slot], out: &mut Vec<SlotRelease>) {
        let others = match &self.pool_users {
            Some(users) => samepage_daemon::procmaps::others_map_pool(&self.pool.identity(), users),
            None => true,
        };
        if others {
            out.extend(slots.iter().map(|_| SlotRelease::Kept));
            return;
        }
        let _ = self.pool.zap_view();
        for &slot in slots {
            out.push(match self.pool.release(slot, &self.pagemap) {
                Ok(true) => SlotRelease::Retired,
                Ok(false) | Err(_) => SlotRelease::Kept,
            });
        }
        let _ = self.pool.zap_view();
    }

    /// Pages `m`, a move of `n` pages to or from the scratch area at
    /// `scratch`, really moved. The count is the kernel's word and the page
    /// tables are the truth: on 6.18 a failing `UFFDIO_MOVE` can move pages
    /// past the count it answers. Past it, a page present in the scratch
    /// area (`out`: the move went there) or gone from it (a move back) moved
    /// too; left uncounted, it would be lost.
    fn really_moved(&mut self, m: &super::uffd::Moved, n: usize, scratch: PageAddr, out: bool) -> usize {
        let mut got = m.bytes / PAGE_SIZE;
        if m.stopped.is_some() {
            let present = |a: PageAddr| self.pagemap.entry(a).ok().map(|e| e & pagemap::PM_PRESENT != 0);
            while got < n && present(scratch.add_pages(got)) == Some(out) {
                self.stats.uncounted_moves += 1;
                got += 1;
            }
        }
        got
    }

    /// The userfaultfd's kind.
    pub fn uffd_mode(&self) -> UffdMode {
        self.uffd.mode()
    }

    /// Whether writes to merged pages are served by the breaker (see
    /// [`super::breaker`]), so written pages can merge again.
    pub fn breaks_cow(&self) -> bool {
        self.breaker.is_some()
    }

    /// The pool memfd's inode (how `/proc/self/maps` shows its mappings).
    pub fn pool_inode(&self) -> u64 {
        self.pool.inode()
    }

    /// Whether `PAGEMAP_SCAN` is used (else `/proc/self/pagemap` reads).
    pub fn has_pagemap_scan(&self) -> bool {
        self.pagemap.has_scan()
    }

    /// System calls made so far.
    pub fn stats(&self) -> SpaceStats {
        let reg = self.reg();
        SpaceStats {
            cow_breaks: reg.cow_breaks,
            cow_fallbacks: reg.cow_fallbacks,
            plain_discards: reg.plain_discards,
            ..self.stats.clone()
        }
    }

    /// The VMA limit the engine stays under.
    pub fn vma_limit(&self) -> u64 {
        self.reg().budget.limit()
    }

    /// Re-reads `vm.max_map_count` and the mapping count.
    pub fn recount_vmas(&mut self) {
        self.reg().budget.recount();
    }

    /// Bytes of the page space's own bookkeeping (which slot each merged page maps).
    pub fn metadata_bytes(&self) -> u64 {
        let reg = self.reg();
        reg.regions.values().map(|r| r.slots.bytes()).sum::<u64>() + reg.slot_refs.capacity() as u64 * 16
    }

    /// Reads what adding the region `[base, base + npages pages)` needs
    /// from `/proc` (its attributes, and pool mappings left there by an
    /// earlier registration): slow with many mappings, so done before the
    /// engine's lock is taken. The range must not be registered yet.
    pub fn prepare_region(base: PageAddr, npages: u64, pool_inode: u64) -> Result<PreparedRegion, SysError> {
        let range = PageRange::new(base, npages as usize);
        let segments = segments_of(range, pool_inode)?;
        let mut slots = PoolSlots::new(npages);
        // Pool mappings already there were left by an earlier registration
        // (pool copies): known as such, and their slots are referenced already.
        for m in mem::maps_in(base.get(), range.end().get())? {
            if m.inode == pool_inode && pool_inode != 0 {
                let first = ((m.start.max(base.get()) - base.get()) / PAGE_SIZE) as u64;
                let last = ((m.end.min(range.end().get()) - base.get()) / PAGE_SIZE) as u64;
                let skip = (m.start.max(base.get()) - m.start) / PAGE_SIZE;
                for (k, i) in (first..last).enumerate() {
                    slots.set(i, Some(Slot(m.offset / PAGE_SIZE as u64 + (skip + k) as u64)));
                    // Their history is unknown: never moved.
                    slots.taint(i);
                }
            }
        }
        Ok(PreparedRegion(RegionMap { base, npages, slots, released: Vec::new(), segments }))
    }

    /// Adds a region prepared by [`LinuxPageSpace::prepare_region`]; returns
    /// the page ranges excluded for their attributes, and why.
    pub fn add_region(&mut self, id: RegionId, prepared: PreparedRegion) -> Vec<(Range<u64>, Exclusion)> {
        let map = prepared.0;
        let excluded = map.segments.iter().filter_map(|s| Some((s.pages.clone(), s.excluded.clone()?))).collect();
        self.reg().regions.insert(id, map);
        excluded
    }

    /// Reads the attributes of region `id` again (`/proc/self/smaps`): the
    /// program changed them since registration. Returns the ranges now
    /// excluded, and why (the caller unmerges what was merged there).
    pub fn refresh_attributes(&mut self, id: RegionId) -> Result<Vec<(Range<u64>, Exclusion)>, SysError> {
        let range = {
            let reg = self.reg();
            let Some(r) = reg.regions.get(&id) else { return Ok(Vec::new()) };
            PageRange::new(r.base, r.npages as usize)
        };
        let segments = segments_of(range, self.pool.inode())?;
        let mut reg = self.reg();
        reg.stale.remove(&id);
        let Some(r) = reg.regions.get_mut(&id) else { return Ok(Vec::new()) };
        r.segments = segments;
        Ok(r.segments.iter().filter_map(|s| Some((s.pages.clone(), s.excluded.clone()?))).collect())
    }

    /// Regions whose attributes a merge found changed (see `Registry::stale`).
    pub fn stale_regions(&self) -> Vec<RegionId> {
        self.reg().stale.iter().copied().collect()
    }

    /// Applies `hint` to `[start, start + pages)` of region `id`, merged
    /// pages included (they are mappings of their own inside the range).
    pub fn advise(&mut self, id: RegionId, pages: Range<u64>, hint: mem::Hint) -> Result<(), SysError> {
        let span = {
            let reg = self.reg();
            let Some(r) = reg.regions.get(&id) else { return Ok(()) };
            r.range(pages)
        };
        mem::advise(span, hint)
    }

    /// Locks `pages` of region `id` (`mlock`), merged pages included, without
    /// the write fault a plain `mlock` of a private file mapping takes (which
    /// would copy every merged page): `MLOCK_ONFAULT`, then a read fault on
    /// every page, so all of it is resident and locked. `unlock` reverses it.
    pub fn lock(&mut self, id: RegionId, pages: Range<u64>, unlock: bool) -> Result<(), SysError> {
        let span = {
            let reg = self.reg();
            let Some(r) = reg.regions.get(&id) else { return Ok(()) };
            r.range(pages)
        };
        if unlock {
            return mem::unlock(span);
        }
        mem::lock_on_fault(span)?;
        mem::populate_read(span)
    }

    /// Forgets a region (after the core unmerged it). Pool copies left in it
    /// keep their slots referenced for good: the program still maps them.
    pub fn remove_region(&mut self, id: RegionId) {
        let mut reg = self.reg();
        if let Some(r) = reg.regions.remove(&id) {
            for p in r.pieces(0..r.npages) {
                for u in [&self.window_uffd, &self.pool_uffd] {
                    let _ = u.unregister(r.range(p.clone()));
                    let _ = u.wake(r.range(p.clone()));
                }
            }
        }
        reg.slot_refs.shrink_to_fit();
        reg.budget.recount();
    }

    fn scratch_for(&mut self, locked: bool) -> Result<Scratch, SysError> {
        if !locked {
            return Ok(self.scratch);
        }
        if let Some(s) = self.scratch_locked {
            return Ok(s);
        }
        let s = Scratch::new(&self.uffd, true)?;
        self.scratch_locked = Some(s);
        Ok(s)
    }

    /// Carries out the sorted intents `order`, window by window; intents
    /// whose page `UFFDIO_MOVE` refused go to `busy`.
    fn merge_sorted(
        &mut self,
        intents: &[Intent],
        order: &[usize],
        results: &mut [IntentResult],
        busy: &mut Vec<usize>,
    ) {
        let mut w = 0;
        while w < order.len() {
            let region = intents[order[w]].page.region;
            // A window stays in one region and one attribute segment, never
            // spans a released range, and takes one kind of page: anonymous
            // pages move, pages in pool mappings are refiled.
            let plan = {
                let reg = self.reg();
                reg.regions.get(&region).map(|r| {
                    let first = intents[order[w]].page.index;
                    let seg_end = r.segment(first).pages.end;
                    let in_pool = r.slots.get(first).is_some();
                    let most =
                        if r.segment(first).keep.contains(Keep::LOCKED) { LOCKED_SCRATCH_PAGES } else { SCRATCH_PAGES };
                    let mut end = w + 1;
                    while end < order.len() && end - w < most {
                        let (a, b) = (intents[order[end - 1]].page, intents[order[end]].page);
                        if b.region != region
                            || b.index - a.index > WINDOW_GAP
                            || b.index >= seg_end
                            || r.released_between(a.index, b.index)
                            || r.slots.get(b.index).is_some() != in_pool
                            // A merge window never covers pool mappings: closing
                            // it lifts write protection in its range.
                            || !in_pool && r.slots.any_in(a.index + 1, b.index)
                        {
                            break;
                        }
                        end += 1;
                    }
                    (end, in_pool, r.base, r.segment(first).keep)
                })
            };
            let Some((end, in_pool, base, keep)) = plan else {
                w += 1;
                continue;
            };
            if in_pool {
                self.refile_window(region, base, keep, intents, &order[w..end], results);
            } else {
                self.move_window(region, base, keep, intents, &order[w..end], results, busy);
            }
            w = end;
        }
    }

    /// Merges anonymous pages `idx` (sorted, one region and segment, the
    /// region starting at `base`) by moving them out (see the module's
    /// description).
    #[allow(clippy::too_many_arguments, reason = "one window's inputs and outputs, all used")]
    fn move_window(
        &mut self,
        region: RegionId,
        base: PageAddr,
        keep: Keep,
        intents: &[Intent],
        idx: &[usize],
        results: &mut [IntentResult],
        busy: &mut Vec<usize>,
    ) {
        let page = |k: usize| intents[idx[k]].page.index;
        let addr = |i: u64| base.add_pages(i as usize);
        let span = PageRange::new(addr(page(0)), (page(idx.len() - 1) - page(0) + 1) as usize);
        let Ok(scratch) = self.scratch_for(keep.contains(Keep::LOCKED)) else { return };
        // While pages are out, a forked child would inherit holes (reading
        // zeros, with no window to wait for): fork() waits for the window.
        let no_fork = super::forkguard::hold();
        let wuffd = self.window_uffd.clone();
        if let Err(e) = wuffd.register(span, RegisterMode::MISSING) {
            // A VMA takes one userfaultfd: part of the span may be the
            // program's own (EBUSY), as when a merge-any sweep registered
            // neighbouring mappings as one region. Then the halves on their
            // own, down to single pages; what still fails (or fails for
            // another reason) stays Failed, nothing changed. The region's
            // attributes are read again before its next merge: a VMA of the
            // program's own userfaultfd (`um`/`uw`/`ui`) is then left out
            // (`Exclusion::OtherUserfaultfd`), and is not tried again.
            drop(no_fork);
            if e.errno == rustix::io::Errno::BUSY {
                lock(&self.registry).stale.insert(region);
            }
            if e.errno == rustix::io::Errno::BUSY && idx.len() > 1 {
                let (low, high) = idx.split_at(idx.len() / 2);
                self.move_window(region, base, keep, intents, low, results, busy);
                self.move_window(region, base, keep, intents, high, results, busy);
            }
            return;
        }
        let _no_fork = no_fork; // (dropped after the window)
        self.stats.windows += 1;
        let mut window = Window { uffd: &wuffd, range: span, open: true };

        // Out: each run of consecutive pages with one UFFDIO_MOVE.
        let mut at: Vec<Option<usize>> = vec![None; idx.len()];
        let mut used = 0;
        let mut k = 0;
        while k < idx.len() {
            let mut e = k + 1;
            while e < idx.len() && page(e) == page(e - 1) + 1 {
                e += 1;
            }
            let (mut pos, mut again, mut single) = (k, 0, false);
            while pos < e {
                let n = if single { 1 } else { e - pos };
                // SAFETY: the pages are the program's, inside a MISSING window:
                // anyone touching them waits until they are back or replaced;
                // the scratch pages from `used` on are empty.
                let m = unsafe { self.uffd.move_pages(scratch.range.page(used), addr(page(pos)), n) };
                self.stats.moves += 1;
                // The scratch pages from `used` on were empty: a page there went out.
                let got = self.really_moved(&m, n, scratch.range.page(used), true);
                for (j, slot) in at[pos..pos + got].iter_mut().enumerate() {
                    *slot = Some(used + j);
                }
                self.stats.pages_moved += got as u64;
                (used, pos) = (used + got, pos + got);
                single = false;
                match m.stopped {
                    None => {}
                    // One call moves pages of one VMA only: where a run
                    // crosses a mapping boundary, the page there goes alone.
                    Some(Errno::INVAL) if got < n && n > 1 => single = true,
                    Some(Errno::AGAIN) if again < 3 => again += 1,
                    // One page refused for its mapping's flags: the program
                    // changed them (mlock, a protection key) since.
                    Some(Errno::INVAL) => {
                        lock(&self.registry).stale.insert(region);
                        pos += 1;
                    }
                    // Pinned, or shared with another process.
                    Some(Errno::BUSY) => {
                        busy.push(idx[pos]);
                        pos += 1;
                    }
                    // No page there any more: the program discarded it.
                    Some(Errno::NOENT) => {
                        results[idx[pos]] = IntentResult::Mismatch;
                        pos += 1;
                    }
                    Some(_) => pos += 1,
                }
            }
            k = e;
        }

        // Compare, where nobody else can write.
        let mut equal = vec![false; idx.len()];
        for k in 0..idx.len() {
            let Some(s) = at[k] else { continue };
            // SAFETY: a scratch page holding a page just moved in: only the
            // engine maps it, and the move checked that no device pins it.
            let moved = unsafe { std::slice::from_raw_parts(scratch.range.page(s).ptr().cast_const(), PAGE_SIZE) };
            equal[k] = match intents[idx[k]].target {
                Target::Slot(slot) => self.pool.slot_equals(slot, moved, &mut self.slot_buf),
                Target::Zero => moved.iter().all(|&b| b == 0),
            };
            if !equal[k] {
                results[idx[k]] = IntentResult::Mismatch;
            }
        }

        // The program may be discarding pages of the window right now
        // (`madvise(MADV_DONTNEED)` waits on the window's remove event):
        // those stay out, and the range reads zeros as it would have.
        let mut gone = self.serve_window_events(false);
        let is_gone = |gone: &[(usize, usize)], a: PageAddr| gone.iter().any(|&(s, e)| s <= a.get() && a.get() < e);
        for k in 0..idx.len() {
            if at[k].is_some() && is_gone(&gone, addr(page(k))) {
                (at[k], equal[k]) = (None, false);
                results[idx[k]] = IntentResult::Mismatch;
            }
        }

        // Replace: runs of equal pages going to consecutive slots, one mmap
        // each, recorded in the registry and write-protected at once (the
        // span is busy meanwhile: writes to the new runs wait).
        let (registry, pool_uffd) = (self.registry.clone(), self.pool_uffd.clone());
        let breaks = self.breaker.is_some();
        let marked = breaks.then(|| Busy::new(&registry, &pool_uffd, span));
        let mut new_runs = Vec::new();
        let mut k = 0;
        while k < idx.len() {
            if !equal[k] {
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < idx.len()
                && equal[e]
                && page(e) == page(e - 1) + 1
                && match (intents[idx[e - 1]].target, intents[idx[e]].target) {
                    (Target::Slot(a), Target::Slot(b)) => b.0 == a.0 + 1,
                    (Target::Zero, Target::Zero) => true,
                    _ => false,
                }
            {
                e += 1;
            }
            let run = PageRange::new(addr(page(k)), e - k);
            let outcome = match intents[idx[k]].target {
                // The pages are out: the range already reads zeros.
                Target::Zero => Ok(()),
                Target::Slot(_) if !lock(&self.registry).budget.allows(2) => Err(IntentResult::OverBudget),
                Target::Slot(s) => {
                    self.stats.pool_maps += 1;
                    // Mapped, recorded and registered under the registry's
                    // lock: the breaker, serving a discard, sees the run
                    // either not there yet or registered with its events.
                    let mut reg = lock(&registry);
                    let made = fault::check(Point::MapPool, "mmap(pool, MAP_PRIVATE|MAP_FIXED)").and_then(|()| {
                        // SAFETY: the run's pages are out in the scratch area
                        // and equal the pool slots byte for byte; anyone
                        // touching the run waits for the window.
                        unsafe { place(run, Backing::Pool(self.pool.fd(), s.0 * PAGE_SIZE as u64), keep) }
                    });
                    if matches!(&made, Err(e) if e.errno == Errno::PERM) {
                        // Sealed since (mseal).
                        reg.stale.insert(region);
                    }
                    match made {
                        Ok(()) => {
                            reg.budget.spent(2);
                            for &i in &idx[k..e] {
                                if let Target::Slot(s) = intents[i].target {
                                    *reg.slot_refs.entry(s).or_default() += 1;
                                    if let Some(rm) = reg.regions.get_mut(&region) {
                                        rm.slots.set(intents[i].page.index, Some(s));
                                    }
                                }
                            }
                            if breaks {
                                let _ = pool_uffd.register(run, RegisterMode::WP);
                            }
                            drop(reg);
                            if breaks {
                                protect(&pool_uffd, run);
                            }
                            new_runs.push(run);
                            Ok(())
                        }
                        Err(_) => Err(IntentResult::Failed),
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    for &i in &idx[k..e] {
                        results[i] = IntentResult::Merged;
                    }
                }
                Err(why) => {
                    for &i in &idx[k..e] {
                        results[i] = why;
                    }
                    // A failed `place` leaves the range as it was: anonymous,
                    // its pages out, ready for them to come back.
                    equal[k..e].iter_mut().for_each(|x| *x = false);
                }
            }
            k = e;
        }

        // Back: the pages that were moved out and not merged. A move into
        // the window waits for its remove events to be read (`EAGAIN`).
        let mut k = 0;
        let mut waits = 0u32;
        while k < idx.len() {
            let Some(s) = at[k].filter(|_| !equal[k]) else {
                k += 1;
                continue;
            };
            if is_gone(&gone, addr(page(k))) {
                at[k] = None;
                results[idx[k]] = IntentResult::Mismatch;
                k += 1;
                continue;
            }
            let mut e = k + 1;
            while e < idx.len()
                && !equal[e]
                && page(e) == page(e - 1) + 1
                && at[e] == Some(s + (e - k))
                && !is_gone(&gone, addr(page(e)))
            {
                e += 1;
            }
            // SAFETY: the destination is the program's range these pages
            // came from, emptied by the move and held by the window; the
            // source is ours.
            let m = unsafe { wuffd.move_pages(addr(page(k)), scratch.range.page(s), e - k) };
            self.stats.moves += 1;
            // A page gone from the scratch area came back.
            let got = self.really_moved(&m, e - k, scratch.range.page(s), false);
            at[k..k + got].iter_mut().for_each(|x| *x = None);
            k += got;
            match m.stopped {
                None => {}
                Some(Errno::AGAIN) if waits < 100_000 => {
                    waits += 1;
                    let more = self.serve_window_events(!new_runs.is_empty());
                    if more.is_empty() {
                        std::thread::yield_now();
                    }
                    gone.extend(more);
                }
                Some(_) => {
                    // A mapping boundary inside the run: the page alone; if
                    // even that fails (no memory for page tables), it goes
                    // back as a copy moved into place.
                    if let Some(from) = at[k].take() {
                        // SAFETY: as above, one page.
                        let single = unsafe { wuffd.move_pages(addr(page(k)), scratch.range.page(from), 1) };
                        // Moved after all, whatever the call said, it must
                        // not be copied: reading the empty scratch page would
                        // wait forever (the scratch area is registered MISSING).
                        if self.really_moved(&single, 1, scratch.range.page(from), false) == 0 {
                            restore_by_copy(scratch.range.sub(from, from + 1), PageRange::new(addr(page(k)), 1), keep);
                        }
                    }
                    k += 1;
                }
            }
        }

        // Close: the range leaves the window (waiters wake and find their
        // page or the merged one); remove events raised until then are
        // served before their callers go on; pages the kernel copied in
        // place between a run's mapping and its protection are marked.
        // (UFFDIO_UNREGISTER refuses a range holding another userfaultfd's
        // registration: the new pool runs are left out.)
        let mut from = span.start();
        for run in new_runs.iter().chain(std::iter::once(&PageRange::new(span.end(), 0))) {
            if run.start() > from {
                let _ = wuffd.unregister(PageRange::new(from, run.start().pages_since(from)));
            }
            from = run.end();
        }
        window.open = false;
        self.drain_window_events(!new_runs.is_empty());
        if breaks && !new_runs.is_empty() {
            let mut found = Vec::new();
            for run in &new_runs {
                let _ = self.pagemap.scan(run.start().get(), run.end().get(), run.pages(), &mut found);
            }
            let mut reg = self.reg();
            if let Some(r) = reg.regions.get_mut(&region) {
                for a in found.iter().flat_map(|f| (f.start..f.end).step_by(PAGE_SIZE)) {
                    let i = PageAddr::containing(a).pages_since(r.base) as u64;
                    r.slots.taint(i);
                }
            }
        }
        drop(marked);
        let _ = wuffd.wake(span);
        scratch.clear(used);
    }

    /// Reads the merge windows' userfaultfd: a remove event is a
    /// `madvise(MADV_DONTNEED)` (or `FREE`) of the program on a window's
    /// range, waiting to go on. Once the event is read, the caller looks up
    /// the mapping at the start of its range again and discards what it
    /// finds there, up to that mapping's end, with no further event for it;
    /// mappings after that send their own. So the pages of the range still
    /// out must stay out (a hole reads zeros), and a pool run already mapped
    /// at the start of the range must become anonymous before the event is
    /// read: when pool runs were mapped in the window (`placed`), the
    /// callers in `madvise` are looked at before each message (as the
    /// breaker does), and the pool mappings in their ranges made fresh
    /// anonymous memory. Returns the ranges discarded.
    fn serve_window_events(&mut self, placed: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut msg = [super::breaker::FaultMsg::default(); 1];
        loop {
            if placed && !self.window_pending.any() {
                let seen = self.peeker.discards();
                if !seen.is_empty() {
                    let mut reg = self.reg();
                    for &(a, b) in &seen {
                        reg.noticed_discard(a, b);
                    }
                }
            }
            if self.window_uffd.read_messages(&mut msg) == 0 {
                return out;
            }
            out.extend(msg[0].removed());
        }
    }

    /// Serves the merge windows' remove events until none can still come
    /// for a range just unregistered: the kernel counts a remove in
    /// progress (`mmap_changing`) before it drops the caller's lock and
    /// queues the event, so an event may arrive after the range left the
    /// window. While one is in progress, `UFFDIO_WRITEPROTECT` on the
    /// userfaultfd answers `EAGAIN` before it looks at the range. The probe
    /// is a page of the scratch area, which is not registered for write
    /// protection, so it changes nothing (`ENOENT`): the ioctl does not
    /// check which userfaultfd a range is registered with, so a probe on a
    /// pool mapping would lift that mapping's protection.
    fn drain_window_events(&mut self, placed: bool) {
        let probe = self.scratch.range.sub(0, 1);
        self.serve_window_events(placed);
        for _ in 0..100_000 {
            match self.window_uffd.write_protect(probe, false) {
                Err(e) if e.errno == Errno::AGAIN => {
                    std::thread::yield_now();
                    self.serve_window_events(placed);
                }
                _ => break,
            }
        }
    }

    /// Moves pages `idx` that map the pool (sorted, one region and segment)
    /// to other slots (defragmentation's refiles) while writers to them
    /// wait. A page found to be a pool copy is left alone.
    fn refile_window(
        &mut self,
        region: RegionId,
        base: PageAddr,
        keep: Keep,
        intents: &[Intent],
        idx: &[usize],
        results: &mut [IntentResult],
    ) {
        let page = |k: usize| intents[idx[k]].page.index;
        let addr = |i: u64| base.add_pages(i as usize);
        let span = PageRange::new(addr(page(0)), (page(idx.len() - 1) - page(0) + 1) as usize);
        self.stats.write_protects += 1;
        let breaks = self.breaker.is_some();
        let Ok(window) = open_wp_window(&self.pool_uffd, &self.registry, breaks, span) else { return };
        let copies = pool_copies_in(&mut self.pagemap, &mut self.runs, span);
        let mut k = 0;
        while k < idx.len() {
            let Target::Slot(s) = intents[idx[k]].target else {
                k += 1;
                continue;
            };
            let mut e = k + 1;
            while e < idx.len()
                && page(e) == page(e - 1) + 1
                && matches!(intents[idx[e]].target, Target::Slot(t) if t.0 == s.0 + (e - k) as u64)
            {
                e += 1;
            }
            // Pool copies stay; the others are pool pages (which never change).
            let mut j = k;
            while j < e {
                let is_copy = |x: usize| copies.contains(&addr(page(x)).get());
                if is_copy(j) {
                    results[idx[j]] = IntentResult::Mismatch;
                    j += 1;
                    continue;
                }
                let mut f = j + 1;
                while f < e && !is_copy(f) {
                    f += 1;
                }
                let run = PageRange::new(addr(page(j)), f - j);
                let slot = Slot(s.0 + (j - k) as u64);
                let ok = lock(&self.registry).budget.allows(2)
                    && (0..f - j).all(|x| {
                        // SAFETY: a page of the run, write-protected and mapping the pool: it holds still.
                        unsafe { mem::read_page(run.page(x), &mut self.buf) };
                        self.pool.slot_equals(Slot(slot.0 + x as u64), &self.buf.0, &mut self.slot_buf)
                    });
                // Replaced and recorded under the registry's lock, unless
                // the breaker made part of the run anonymous meanwhile (the
                // program discarded it).
                let mut reg = lock(&self.registry);
                let still = ok && (j..f).all(|x| reg.regions.get(&region).and_then(|r| r.slots.get(page(x))).is_some());
                // SAFETY: the run maps pool pages equal to the target slots
                // byte for byte, write-protected.
                let mapped = still
                    && unsafe { place(run, Backing::Pool(self.pool.fd(), slot.0 * PAGE_SIZE as u64), keep) }.is_ok();
                for x in j..f {
                    results[idx[x]] = if mapped { IntentResult::Merged } else { IntentResult::Failed };
                }
                if mapped {
                    reg.budget.spent(2);
                    self.stats.pool_maps += 1;
                    for x in 0..f - j {
                        let (index, new) = (page(j + x), Slot(slot.0 + x as u64));
                        let old = reg.regions.get(&region).and_then(|r| r.slots.get(index));
                        if let Some(old) = old {
                            release_ref(&mut reg.slot_refs, old);
                        }
                        *reg.slot_refs.entry(new).or_default() += 1;
                        if let Some(rm) = reg.regions.get_mut(&region) {
                            rm.slots.set(index, Some(new));
                        }
                    }
                    if breaks {
                        let _ = self.pool_uffd.register(run, RegisterMode::WP);
                    }
                }
                drop(reg);
                if mapped && breaks {
                    protect(&self.pool_uffd, run);
                }
                j = f;
            }
            k = e;
        }
        drop(window);
    }

    /// Makes `pages` (a range of region `region` in pool mappings) private
    /// with their content intact: the runs of pages that map the pool are
    /// copied and the copy moved over them while writers wait; pool copies
    /// are left where they are, unless `copies_too` (they move out of the
    /// pool mapping the same way).
    fn unmerge_pool_run(
        &mut self,
        region: RegionId,
        base: PageAddr,
        keep: Keep,
        pages: Range<u64>,
        copies_too: bool,
    ) -> Result<(), SysError> {
        let span = PageRange::new(base.add_pages(pages.start as usize), (pages.end - pages.start) as usize);
        fault::check(Point::MapAnon, "mmap(MAP_ANONYMOUS)")?;
        let tmp = mem::map_anon(span.pages())?;
        let breaks = self.breaker.is_some();
        // Parts of `tmp` moved over the range (no longer in `tmp`).
        let mut replaced: Vec<Range<usize>> = Vec::new();
        let result = (|| {
            mem::advise(tmp, mem::Hint::NoHugePage)?;
            // Faulted in before the window opens, so writers wait less.
            mem::populate_write(tmp)?;
            self.stats.write_protects += 1;
            let _window = open_wp_window(&self.pool_uffd, &self.registry, breaks, span)?;
            let copies = pool_copies_in(&mut self.pagemap, &mut self.runs, span);
            let index = |x: usize| pages.start + x as u64;
            let mut j = 0;
            while j < span.pages() {
                // Copied, moved and recorded under the registry's lock: the
                // breaker, serving a discard, finds each page either still
                // merged or already private. Pages it made anonymous since
                // the window opened (discarded) are left as they are.
                let mut reg = lock(&self.registry);
                let merged = |reg: &Registry, x: usize| {
                    (copies_too || !copies.contains(&span.page(x).get()))
                        && reg.regions.get(&region).and_then(|r| r.slots.get(index(x))).is_some()
                };
                if !merged(&reg, j) {
                    j += 1;
                    continue;
                }
                let mut f = j + 1;
                while f < span.pages() && merged(&reg, f) {
                    f += 1;
                }
                // SAFETY: `span` is registered memory mapping pool pages,
                // with writers held off, so it holds still; `tmp` is ours.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        span.page(j).ptr().cast_const(),
                        tmp.page(j).ptr(),
                        (f - j) * PAGE_SIZE,
                    )
                };
                // The attributes go on first: the move carries them over
                // (see `place`).
                put_back(tmp.sub(j, f), keep)?;
                // SAFETY: `tmp`'s part is our own; the target holds the same
                // bytes and only pool pages (pinned, if at all, for reading).
                unsafe { mem::move_mapping(tmp.sub(j, f), span.page(j)) }?;
                replaced.push(j..f);
                for x in j..f {
                    if let Some(s) = reg.regions.get(&region).and_then(|r| r.slots.get(index(x))) {
                        release_ref(&mut reg.slot_refs, s);
                        if let Some(rm) = reg.regions.get_mut(&region) {
                            rm.slots.set(index(x), None);
                        }
                    }
                }
                j = f;
            }
            Ok(())
        })();
        // What was not moved over the range (the parts facing pool copies
        // and discarded pages, or the rest after an error) is still ours.
        let mut pos = 0;
        for part in replaced.iter().chain(std::iter::once(&(span.pages()..span.pages()))) {
            if part.start > pos {
                // SAFETY: parts of `tmp` not moved: still ours, unused.
                let _ = unsafe { mem::unmap(tmp.sub(pos, part.start)) };
            }
            pos = part.end;
        }
        result?;
        Ok(())
    }
}

/// A merge window, registered `MISSING` with the merge windows' userfaultfd:
/// anyone touching its range waits. Dropped while open (a window given up
/// early), it unregisters the range, which wakes the waiters.
struct Window<'a> {
    uffd: &'a Uffd,
    range: PageRange,
    open: bool,
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.uffd.unregister(self.range);
            let _ = self.uffd.wake(self.range);
        }
    }
}

/// Holds writers to the pool pages of `range` off (see [`WpWindow`]);
/// `uffd` is the pool mappings' userfaultfd.
fn open_wp_window<'a>(
    uffd: &'a Uffd,
    registry: &'a Mutex<Registry>,
    breaks: bool,
    range: PageRange,
) -> Result<WpWindow<'a>, SysError> {
    fault::check(Point::WriteProtect, "UFFDIO_WRITEPROTECT")?;
    if breaks {
        // Pool pages are protected already, except where the breaker lifted
        // the protection (a write it could not serve) or protecting failed:
        // protected again before anything is copied or compared, so no write
        // lands unseen. Outside the busy mark, so a pending event is read.
        protect(uffd, range);
    } else {
        uffd.register(range, RegisterMode::WP)?;
        uffd.write_protect(range, true)?;
    }
    let busy = Busy::new(registry, uffd, range);
    Ok(WpWindow { uffd, range, breaks, _busy: busy })
}

/// A window in which pool pages are replaced while their writers wait:
/// write-protected and marked busy, so the breaker leaves writes there
/// waiting. Each replacement is made and recorded under the registry's
/// lock (so the breaker serving a discard sees the registry exact), and
/// with a breaker registered and protected at once. Closing it unregisters
/// the range without a breaker (lifting the protection); the busy mark then
/// goes, which wakes the range.
struct WpWindow<'a> {
    uffd: &'a Uffd,
    range: PageRange,
    breaks: bool,
    _busy: Busy<'a>,
}

impl Drop for WpWindow<'_> {
    fn drop(&mut self) {
        if !self.breaks {
            let _ = self.uffd.unregister(self.range);
        }
    }
}

/// Drops one reference of `slot`.
fn release_ref(refs: &mut HashMap<Slot, u32>, slot: Slot) {
    if let Some(n) = refs.get_mut(&slot) {
        *n -= 1;
        if *n == 0 {
            refs.remove(&slot);
        }
    }
}

/// Write-protects a pool run just mapped (registered with the pool
/// mappings' userfaultfd). `EAGAIN` means an event waits for the breaker,
/// which never waits for this thread: try again. A run the breaker already
/// made anonymous in part (a discard) is protected page by page.
fn protect(uffd: &Uffd, run: PageRange) {
    for _ in 0..10_000 {
        match uffd.write_protect(run, true) {
            Err(e) if e.errno == Errno::AGAIN => std::thread::yield_now(),
            Err(_) if run.pages() > 1 => {
                for i in 0..run.pages() {
                    protect(uffd, run.sub(i, i + 1));
                }
                return;
            }
            _ => return,
        }
    }
}

/// What [`place`] maps over program memory.
#[derive(Clone, Copy)]
enum Backing<'f> {
    /// Fresh zeroed anonymous memory.
    Anon,
    /// Pool pages from `offset`, private.
    Pool(BorrowedFd<'f>, u64),
}

/// Maps `backing` over `range` with the attributes `keep` already on it.
///
/// A mapping made with `MAP_FIXED` is a new VMA without the program's
/// flags, and putting them back takes more system calls: a `fork()` or a
/// read of `/proc/self/smaps` in between would see merged memory without
/// `MADV_DONTFORK` (the child inherits it), `mlock` or `MADV_DONTDUMP`. So a
/// mapping that must carry attributes is made where the kernel picks, given
/// them there, and moved over `range` with one `mremap(MREMAP_FIXED)`,
/// which keeps a VMA's flags: whoever looks sees the old VMA or the new one,
/// each with the program's attributes. On failure `range` is as it was.
///
/// # Safety
/// `range` must be memory the engine may replace (see
/// [`mem::map_file_private_fixed`] and [`mem::map_anon_fixed`]).
unsafe fn place(range: PageRange, backing: Backing<'_>, keep: Keep) -> Result<(), SysError> {
    if keep.is_empty() {
        return match backing {
            // SAFETY: the caller may replace `range`.
            Backing::Anon => unsafe { mem::map_anon_fixed(range) },
            // SAFETY: the caller may replace `range`.
            Backing::Pool(fd, offset) => unsafe { mem::map_file_private_fixed(range, fd, offset) },
        };
    }
    let tmp = match backing {
        Backing::Anon => mem::map_anon(range.pages())?,
        Backing::Pool(fd, offset) => mem::map_file_private(range.pages(), fd, offset)?,
    };
    // SAFETY: `tmp` is ours alone; the caller may replace `range`.
    let placed = put_back(tmp, keep).and_then(|()| unsafe { mem::move_mapping(tmp, range.start()) });
    if placed.is_err() {
        // SAFETY: `tmp` is still ours.
        let _ = unsafe { mem::unmap(tmp) };
    }
    placed
}

/// Puts the attributes `keep` on a range the engine maps (see [`place`]).
fn put_back(range: PageRange, keep: Keep) -> Result<(), SysError> {
    for (flag, hint) in [
        (Keep::DONTFORK, mem::Hint::DontFork),
        (Keep::DONTDUMP, mem::Hint::DontDump),
        (Keep::HUGEPAGE, mem::Hint::HugePage),
        (Keep::NOHUGEPAGE, mem::Hint::NoHugePage),
    ] {
        if keep.contains(flag) {
            mem::advise(range, hint)?;
        }
    }
    if keep.contains(Keep::LOCKED) {
        // Locked as it is faulted in, then faulted in for reading: resident
        // and locked like the memory it replaced, and still merged (a plain
        // mlock would populate with write faults and copy every page).
        mem::lock_on_fault(range)?;
        mem::populate_read(range)?;
    }
    Ok(())
}

/// Last resort when pages cannot be moved back into the program's range:
/// copies them into fresh memory and moves that over the range.
fn restore_by_copy(from: PageRange, to: PageRange, keep: Keep) {
    let Ok(tmp) = mem::map_anon(from.pages()) else { return };
    // SAFETY: `from` is ours (scratch pages nobody else maps), `tmp` fresh.
    unsafe { std::ptr::copy_nonoverlapping(from.start().ptr().cast_const(), tmp.start().ptr(), from.len_bytes()) };
    // The attributes go on first: the move carries them over (see `place`).
    // SAFETY: `tmp` is ours; `to` is the emptied range the pages came from.
    if put_back(tmp, keep).and_then(|()| unsafe { mem::move_mapping(tmp, to.start()) }).is_err() {
        // SAFETY: `tmp` is still ours.
        let _ = unsafe { mem::unmap(tmp) };
    }
}

/// Addresses of the present private pages in `range` (pool copies, where
/// `range` is in pool mappings).
fn pool_copies_in(pagemap: &mut PageMap, runs: &mut Vec<pagemap::Run>, range: PageRange) -> HashSet<usize> {
    runs.clear();
    let _ = pagemap.scan(range.start().get(), range.end().get(), range.pages(), runs);
    runs.iter().flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE)).collect()
}

/// The attribute segments of `range`, covering it (pool mappings, inode
/// `pool_inode`, are the engine's own: their userfaultfd is ours).
fn segments_of(range: PageRange, pool_inode: u64) -> Result<Vec<Segment>, SysError> {
    let vmas = attrs::read(range, pool_inode)?;
    let lock_all = attrs::lock_all_future();
    let mut out: Vec<Segment> = Vec::new();
    let page_of = |a: PageAddr| a.pages_since(range.start()) as u64;
    for v in vmas {
        let pages = page_of(v.range.start())..page_of(v.range.end());
        let excluded = if lock_all { Some(Exclusion::LockAllFuture) } else { v.exclusion };
        match out.last_mut() {
            Some(last) if last.pages.end == pages.start && last.keep == v.keep && last.excluded == excluded => {
                last.pages.end = pages.end;
            }
            _ => out.push(Segment { pages, keep: v.keep, excluded }),
        }
    }
    if out.is_empty() {
        out.push(Segment { pages: 0..range.pages() as u64, keep: Keep::empty(), excluded: None });
    }
    Ok(out)
}

impl PageSpace for LinuxPageSpace {
    fn sample(
        &mut self,
        region: RegionId,
        start: u64,
        end: u64,
        max_present: usize,
        out: &mut Vec<Sample>,
    ) -> Result<u64, SpaceError> {
        let reg = lock(&self.registry);
        let r = reg.regions.get(&region).ok_or(SpaceError::UnknownRegion(region))?;
        let end = end.min(r.npages);
        let (from, to) = (r.addr(start).get(), r.addr(end).get());
        self.runs.clear();
        self.stats.pagemap_scans += 1;
        let walk_end = self.pagemap.scan(from, to, max_present, &mut self.runs)?;
        let base = r.base.get();
        let exclusions = r.segments.iter().any(|s| s.excluded.is_some());
        for run in &self.runs {
            for addr in (run.start..run.end).step_by(PAGE_SIZE) {
                let index = ((addr - base) / PAGE_SIZE) as u64;
                if exclusions && r.excluded(index) {
                    continue;
                }
                // Pages still mapping their pool page are never reported
                // (`PAGEMAP_SCAN` is asked for pages that map no file, the
                // pagemap fallback skips `PM_FILE`): no sample is
                // `PageState::Pool`, the scanner keeps their links as they are.
                let state = if run.categories.contains(Category::PFNZERO) {
                    PageState::ZeroPfn
                } else if r.slots.get(index).is_some() {
                    PageState::PoolCopy
                } else {
                    PageState::Private
                };
                // A transparent huge page is keyed by its 2 MiB frame.
                let huge = run.categories.contains(Category::HUGE).then_some((addr / super::HUGE_PAGE_SIZE) as u64);
                out.push(Sample { index, state, huge });
            }
        }
        Ok(((walk_end - base) / PAGE_SIZE) as u64)
    }

    fn hash_page(&mut self, page: PageRef) -> Result<u64, SpaceError> {
        let addr = lock(&self.registry)
            .regions
            .get(&page.region)
            .ok_or(SpaceError::UnknownRegion(page.region))?
            .addr(page.index);
        // SAFETY: a page of a registered region, mapped while registered.
        unsafe { mem::read_page(addr, &mut self.buf) };
        self.stats.pages_hashed += 1;
        Ok(page_hash(&self.buf.0))
    }

    fn fill_slot(&mut self, page: PageRef, slot: Slot) -> Result<u64, SpaceError> {
        let addr = lock(&self.registry)
            .regions
            .get(&page.region)
            .ok_or(SpaceError::UnknownRegion(page.region))?
            .addr(page.index);
        // SAFETY: a page of a registered region, mapped while registered.
        Ok(unsafe { self.pool.fill(slot, addr, &mut self.buf) })
    }

    fn merge(&mut self, intents: &[Intent], results: &mut Vec<IntentResult>) {
        results.clear();
        results.resize(intents.len(), IntentResult::Failed);
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(0..intents.len());
        order.sort_unstable_by_key(|&i| (intents[i].page.region, intents[i].page.index));
        let mut busy = Vec::new();
        self.merge_sorted(intents, &order, results, &mut busy);
        if !busy.is_empty() {
            // A page once shared with a forked child is not the process's
            // own (PageAnonExclusive) until written: one write fault, which
            // changes no content, makes it so, copying it if the child still
            // maps it. A pinned page is its own already: it stays refused.
            for &i in &busy {
                let p = intents[i].page;
                let page = lock(&self.registry).regions.get(&p.region).map(|r| r.range(p.index..p.index + 1));
                if let Some(page) = page {
                    let _ = mem::populate_write(page);
                    self.stats.unshares += 1;
                }
            }
            let retry = std::mem::take(&mut busy);
            self.merge_sorted(intents, &retry, results, &mut busy);
            for i in busy {
                results[i] = IntentResult::Pinned;
            }
        }
        self.order = order;
    }

    fn unmerge(&mut self, region: RegionId, range: Range<u64>, pages: &[u64]) -> Result<(), SpaceError> {
        let (base, pool_runs, zero) = {
            let reg = lock(&self.registry);
            let r = reg.regions.get(&region).ok_or(SpaceError::UnknownRegion(region))?;
            let end = range.end.min(r.npages);
            // Pool mappings: every page inside one, merged or copied since, so
            // that no pool page is left mapped.
            let pool_runs = r.pool_runs(range.start..end, SCRATCH_PAGES as u64);
            // Zero pages in anonymous memory: made private in place.
            let zero: Vec<u64> = pages.iter().copied().filter(|&p| r.slots.get(p).is_none()).collect();
            (r.base, pool_runs, zero)
        };
        for (run, keep) in pool_runs {
            self.unmerge_pool_run(region, base, keep, run, false)?;
        }
        let mut k = 0;
        while k < zero.len() {
            let mut end = k + 1;
            while end < zero.len() && zero[end] == zero[end - 1] + 1 {
                end += 1;
            }
            let r = PageRange::new(base.add_pages(zero[k] as usize), end - k);
            mem::populate_write(r)?;
            k = end;
        }
        lock(&self.registry).budget.recount();
        Ok(())
    }

    fn release_range(&mut self, region: RegionId, range: Range<u64>) {
        let mut reg = lock(&self.registry);
        let Some(r) = reg.regions.get_mut(&region) else {
            return;
        };
        let range = range.start..range.end.min(r.npages);
        // Nothing of the engine's stays behind but pool copies (which keep
        // their slots referenced): the range was unmerged and no window is
        // open, so what the program does with it next meets its own memory.
        for u in [&self.window_uffd, &self.pool_uffd] {
            let _ = u.unregister(r.range(range.clone()));
            let _ = u.wake(r.range(range.clone()));
        }
        r.released.push(range);
        r.released.sort_by_key(|x| x.start);
        reg.budget.recount();
    }

    fn release_slots(&mut self, slots: &[Slot], out: &mut Vec<SlotRelease>) {
        // Forks wait while slots are freed, and slots stay while a child (or
        // any descendant) still maps the pool: its mappings are invisible to
        // the mapcount when the child has not touched the page yet.
        let _no_fork = super::forkguard::hold();
        if self.pool.is_shared() {
            self.release_shared_slots(slots, out);
            return;
        }
        if super::forkguard::descendants_map(&self.pool.identity()) {
            out.extend(slots.iter().map(|_| SlotRelease::Kept));
            return;
        }
        let reg = lock(&self.registry);
        for &slot in slots {
            out.push(match self.pool.release(slot, &self.pagemap) {
                Ok(true) if reg.slot_refs.contains_key(&slot) => SlotRelease::Retired,
                Ok(true) => SlotRelease::Freed,
                Ok(false) | Err(_) => SlotRelease::Kept,
            });
        }
    }

    fn discard(&mut self, region: RegionId, range: Range<u64>, how: Discard) -> Result<(), SpaceError> {
        let (pieces, base) = {
            let reg = lock(&self.registry);
            let r = reg.regions.get(&region).ok_or(SpaceError::UnknownRegion(region))?;
            let range = range.start..range.end.min(r.npages);
            if r.segments
                .iter()
                .any(|s| s.keep.contains(Keep::LOCKED) && s.pages.start < range.end && range.start < s.pages.end)
            {
                // The kernel's MADV_DONTNEED and MADV_FREE refuse locked memory.
                return Err(SysError::new("madvise(MADV_DONTNEED) on locked memory", Errno::INVAL).into());
            }
            (r.pieces(range), r.base)
        };
        for piece in pieces {
            let span = PageRange::new(base.add_pages(piece.start as usize), (piece.end - piece.start) as usize);
            {
                // A pool mapping would read its pool page again after
                // MADV_DONTNEED: fresh anonymous memory reads zeros. Writers
                // to its pages wait (busy) until it is done.
                let _busy = Busy::new(&self.registry, &self.pool_uffd, span);
                lock(&self.registry).zero_pool_pieces(span.start().get(), span.end().get())?;
            }
            match how {
                // SAFETY: the program discards the range: its content may go.
                Discard::DontNeed | Discard::Remove => unsafe { mem::dont_need(span) }?,
                // SAFETY: as above.
                Discard::Free => unsafe { mem::free_lazily(span) }?,
            }
        }
        Ok(())
    }

    fn slots_equal(&mut self, a: Slot, b: Slot) -> Result<bool, SpaceError> {
        self.pool.read_slot(a, &mut self.buf);
        Ok(self.pool.slot_equals(b, &self.buf.0, &mut self.slot_buf))
    }

    fn drain_discarded(&mut self, out: &mut Vec<PageRef>) {
        let mut reg = lock(&self.registry);
        if reg.discarded.is_empty() {
            return;
        }
        // A page merged again since is not discarded any more.
        let pages = std::mem::take(&mut reg.discarded);
        out.extend(
            pages.into_iter().filter(|p| reg.regions.get(&p.region).is_some_and(|r| r.slots.get(p.index).is_none())),
        );
    }
}
