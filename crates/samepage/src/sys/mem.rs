//! Mappings, advice and raw access to memory other threads may write.
//!
//! Registered memory belongs to the program: any of its threads may write a
//! page while the engine reads it. Such memory is never turned into a `&[u8]`
//! (that would be a data race in Rust's model): a page is copied with a raw
//! `copy_nonoverlapping` (memcpy) into an engine-owned buffer, and all hashing
//! and comparing works on the copy. A copy that raced a writer may mix old and
//! new bytes; the callers hash or compare again, where no one can write the
//! page, before anything merges.
//!
//! Functions that replace or drop memory are `unsafe` with the contract
//! spelled out; advice that never changes content is safe.

use super::addr::{PageAddr, PageRange};
// `own`: a mapping change of the engine's own. Under `samepage run`'s
// seccomp filter it carries the run's tag and is not stopped (see
// `super::seccomp`); elsewhere it is the plain system call.
use super::seccomp::own_syscall as own;
use super::{Op, SysError};
use crate::PAGE_SIZE;
use rustix::fd::AsRawFd;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use std::ffi::c_void;

/// A page-sized, page-aligned buffer owned by the engine.
#[repr(C, align(4096))]
pub struct PageBuf(pub [u8; PAGE_SIZE]);

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageBuf")
    }
}

impl PageBuf {
    /// A zeroed buffer on the heap.
    pub fn new() -> Box<PageBuf> {
        Box::new(PageBuf([0; PAGE_SIZE]))
    }
}

fn c(addr: PageAddr) -> *mut c_void {
    addr.ptr().cast()
}

/// Copies the page at `src` into `dst`.
///
/// # Safety
/// `src` must be a readable mapped page for the whole call. Concurrent writes
/// are allowed: the copy may then mix old and new bytes, which the callers
/// detect by hashing or comparing again.
pub unsafe fn read_page(src: PageAddr, dst: &mut PageBuf) {
    // SAFETY: `src` is readable for PAGE_SIZE bytes (caller), `dst` is our
    // own buffer of PAGE_SIZE bytes; they cannot overlap (ours is on the heap,
    // theirs in mapped memory the engine does not own).
    unsafe { std::ptr::copy_nonoverlapping(src.ptr().cast_const(), dst.0.as_mut_ptr(), PAGE_SIZE) };
}

/// The anonymous mappings the engine made for itself (scratch areas,
/// anonymous temporaries on their way into place), start -> end, until unmapped or
/// moved: a sweep that registers every anonymous mapping of the process
/// (`prctl(PR_SET_MEMORY_MERGE)` served by the preload library) must never
/// take these for the program's memory.
static OWN: std::sync::Mutex<std::collections::BTreeMap<usize, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The registry of the engine's own mappings, held across a `fork` (a
/// fork while another thread held it would leave it held for ever in the
/// child): take it in a `pthread_atfork` prepare handler, after any lock
/// under which the engine maps memory and before the allocator's lock.
pub struct EngineMappingsHold(std::sync::MutexGuard<'static, std::collections::BTreeMap<usize, usize>>);

impl std::fmt::Debug for EngineMappingsHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMappingsHold").finish_non_exhaustive()
    }
}

impl EngineMappingsHold {
    /// Takes the registry.
    pub fn take() -> EngineMappingsHold {
        EngineMappingsHold(OWN.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Forgets every mapping: in a forked child, whose engine (if any) is a
    /// new one. The parent's `MADV_DONTFORK` mappings are not in the child,
    /// so their addresses are free there, and a mapping the child makes
    /// later may land on one: it is the program's, not the engine's.
    pub fn forget_all(&mut self) {
        self.0.clear();
    }
}

fn own_insert(r: PageRange) {
    OWN.lock().unwrap_or_else(|e| e.into_inner()).insert(r.start().get(), r.start().get() + r.len_bytes());
}

/// Forgets the engine's own mappings inside `[a, b)` (unmapped or moved
/// away; a partial unmap forgets the whole mapping, which only makes a sweep
/// see it sooner).
fn own_remove(a: usize, b: usize) {
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    let first = own.range(..=a).next_back().filter(|(_, e)| **e > a).map_or(a, |(s, _)| *s);
    while let Some(s) = own.range(first..b).next().map(|(s, _)| *s) {
        own.remove(&s);
    }
}

/// Starts a thread of the engine, named `name` (`samepage-…`: the
/// supervisor and the metrics know the engine's threads by it), whose first
/// act is [`keep_thread_arena_out`].
pub fn spawn_engine_thread<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new().name(name.into()).spawn(move || {
        keep_thread_arena_out();
        f()
    })
}

/// Keeps the C library's `malloc` arena of the calling thread out of
/// merging: every thread of the engine does it first
/// ([`spawn_engine_thread`]).
///
/// The engine's Rust allocations can come from a heap of their own (the
/// preload library's), but the C library allocates for itself on the
/// calling thread too (`opendir`, thread-local destructor lists, a new
/// thread's TLS), from that thread's arena. Under `--merge-any` the sweep
/// registers every private anonymous mapping, and a merged page of an
/// engine thread's arena is a self-deadlock: the thread faults on it while
/// it holds the page space, which the copy-on-write breaker waits for
/// (seen with gdb: `samepage-ksmd` in `handle_userfault` under
/// `_int_malloc` from `opendir`).
///
/// glibc's main arena grows the program break; every other arena lives in
/// heaps of `HEAP_MAX_SIZE` (64 MiB on 64-bit), aligned to their size
/// (`malloc/arena.c`, `new_heap`). So the heap around a fresh allocation of
/// this thread is recorded as the engine's own (see [`engine_mappings`]),
/// unless it is the main arena's, below the break (then the engine's
/// threads must not allocate from the C library while they hold the page
/// space: `Peeker` lists threads without `opendir` for this reason).
fn keep_thread_arena_out() {
    const HEAP_MAX_SIZE: usize = 64 << 20;
    // SAFETY: malloc(1) returns a fresh allocation or null; freed at once.
    let p = unsafe { libc::malloc(1) } as usize;
    if p == 0 {
        return;
    }
    // SAFETY: `p` came from malloc above and is freed once.
    unsafe { libc::free(p as *mut c_void) };
    // SAFETY: brk(0) changes nothing; it returns the current break.
    let brk = unsafe { own(libc::SYS_brk, [0; 6]) }.unwrap_or(0);
    if p < brk {
        return;
    }
    let heap = p & !(HEAP_MAX_SIZE - 1);
    OWN.lock().unwrap_or_else(|e| e.into_inner()).insert(heap, heap + HEAP_MAX_SIZE);
}

/// The engine's own anonymous mappings right now, as `(start, end)`.
pub fn engine_mappings() -> Vec<(usize, usize)> {
    OWN.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(s, e)| (*s, *e)).collect()
}

/// Fresh private anonymous memory where the kernel picks, zeroed.
pub fn map_anon(pages: usize) -> Result<PageRange, SysError> {
    // SAFETY: without MAP_FIXED the kernel picks an unused range: nothing is replaced.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .op("mmap(MAP_ANONYMOUS)")?;
    let start = PageAddr::new(p as usize).expect("mmap returns page-aligned addresses");
    own_insert(PageRange::new(start, pages));
    Ok(PageRange::new(start, pages))
}

/// As [`map_anon`], reserving no swap (`MAP_NORESERVE`): for large scratch
/// areas of which only a little is ever populated at a time.
pub fn map_anon_noreserve(pages: usize) -> Result<PageRange, SysError> {
    // SAFETY: as in `map_anon`: nothing is replaced.
    let p = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )
    }
    .op("mmap(MAP_ANONYMOUS|MAP_NORESERVE)")?;
    let start = PageAddr::new(p as usize).expect("mmap returns page-aligned addresses");
    own_insert(PageRange::new(start, pages));
    Ok(PageRange::new(start, pages))
}

/// Maps fresh zeroed anonymous memory over `range`.
///
/// # Safety
/// `range` must be memory the engine may replace: whatever it held is gone.
pub unsafe fn map_anon_fixed(range: PageRange) -> Result<(), SysError> {
    // SAFETY: MAP_FIXED replaces exactly `range`, which the caller may replace.
    unsafe {
        own(
            libc::SYS_mmap,
            [
                range.start().get(),
                range.len_bytes(),
                (ProtFlags::READ | ProtFlags::WRITE).bits() as usize,
                (MapFlags::PRIVATE | MapFlags::FIXED).bits() as usize | libc::MAP_ANONYMOUS as usize,
                usize::MAX, // fd -1
                0,
            ],
        )
    }
    .op("mmap(MAP_ANONYMOUS|MAP_FIXED)")?;
    Ok(())
}

/// Maps `range.pages()` pages of `fd` from `offset` over `range`, private and
/// writable: reads share the file's pages, a write gets a private copy.
///
/// # Safety
/// `range` must be memory the engine may replace: its content must equal the
/// file's (checked where no one could write it), or be unused.
pub unsafe fn map_file_private_fixed(range: PageRange, fd: impl rustix::fd::AsFd, offset: u64) -> Result<(), SysError> {
    // SAFETY: MAP_FIXED replaces exactly `range`, which the caller may replace.
    unsafe {
        own(
            libc::SYS_mmap,
            [
                range.start().get(),
                range.len_bytes(),
                (ProtFlags::READ | ProtFlags::WRITE).bits() as usize,
                (MapFlags::PRIVATE | MapFlags::FIXED).bits() as usize,
                fd.as_fd().as_raw_fd() as usize,
                offset as usize,
            ],
        )
    }
    .op("mmap(pool, MAP_PRIVATE|MAP_FIXED)")?;
    Ok(())
}

/// Maps `pages` pages of `fd` from `offset` private and writable where the
/// kernel picks (nothing is replaced): a mapping to dress with attributes
/// before [`move_mapping`] puts it in place.
pub fn map_file_private(pages: usize, fd: impl rustix::fd::AsFd, offset: u64) -> Result<PageRange, SysError> {
    // SAFETY: without MAP_FIXED the kernel picks an unused range: nothing is replaced.
    let p = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            pages * PAGE_SIZE,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
            fd,
            offset,
        )
    }
    .op("mmap(pool, MAP_PRIVATE)")?;
    let start = PageAddr::new(p as usize).expect("mmap returns page-aligned addresses");
    // (Not in `OWN`: a file mapping is never taken for anonymous memory.)
    Ok(PageRange::new(start, pages))
}

/// Moves the mapping `from` over `to` (`mremap` with `MREMAP_FIXED`): the
/// pages move, nothing is copied, and whatever `to` held is gone.
///
/// # Safety
/// `from` must be one mapping the engine owns and nothing uses afterwards;
/// `to` a range the engine may replace.
pub unsafe fn move_mapping(from: PageRange, to: PageAddr) -> Result<(), SysError> {
    // SAFETY: the caller owns `from` and may replace `to`.
    unsafe {
        own(
            libc::SYS_mremap,
            [
                from.start().get(),
                from.len_bytes(),
                from.len_bytes(),
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as usize,
                to.get(),
                0,
            ],
        )
    }
    .op("mremap(MREMAP_FIXED)")?;
    own_remove(from.start().get(), from.start().get() + from.len_bytes());
    Ok(())
}

/// Unmaps `range`.
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap(range: PageRange) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { own(libc::SYS_munmap, [range.start().get(), range.len_bytes(), 0, 0, 0, 0]) }.op("munmap")?;
    own_remove(range.start().get(), range.start().get() + range.len_bytes());
    Ok(())
}

/// `madvise(MADV_DONTNEED)`: drops the pages of `range`; anonymous memory
/// reads as zeros afterwards, a private file mapping reads the file again.
///
/// # Safety
/// The range's content may be discarded.
pub unsafe fn dont_need(range: PageRange) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { own(libc::SYS_madvise, [range.start().get(), range.len_bytes(), libc::MADV_DONTNEED as usize, 0, 0, 0]) }
        .op("madvise(MADV_DONTNEED)")
        .map(drop)
}

/// `madvise(MADV_FREE)`: the pages of anonymous `range` may be freed lazily
/// (they read as zeros or their old content until written).
///
/// # Safety
/// The range's content may be discarded.
pub unsafe fn free_lazily(range: PageRange) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { own(libc::SYS_madvise, [range.start().get(), range.len_bytes(), libc::MADV_FREE as usize, 0, 0, 0]) }
        .op("madvise(MADV_FREE)")
        .map(drop)
}

/// `madvise(MADV_POPULATE_WRITE)`: a write fault on every page without
/// changing content: breaks copy-on-write (of zero pages and shared pages),
/// and makes a page shared with a forked child this process's own again.
pub fn populate_write(range: PageRange) -> Result<(), SysError> {
    // SAFETY: POPULATE_WRITE never changes the content of a mapping; it only
    // makes each page private and writable, like a write of the same bytes.
    unsafe { rustix::mm::madvise(c(range.start()), range.len_bytes(), Advice::LinuxPopulateWrite) }
        .op("madvise(MADV_POPULATE_WRITE)")
}

/// `madvise(MADV_POPULATE_READ)`: maps every page for reading (a file
/// mapping's pages are mapped, not copied).
pub fn populate_read(range: PageRange) -> Result<(), SysError> {
    // SAFETY: POPULATE_READ never changes content; it only fills page tables.
    unsafe { rustix::mm::madvise(c(range.start()), range.len_bytes(), Advice::LinuxPopulateRead) }
        .op("madvise(MADV_POPULATE_READ)")
}

/// Advice that changes no content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// `MADV_DONTFORK`.
    DontFork,
    /// `MADV_DONTDUMP`.
    DontDump,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_DOFORK`.
    DoFork,
    /// `MADV_DODUMP`.
    DoDump,
    /// `MADV_WIPEONFORK` (anonymous memory only).
    WipeOnFork,
    /// `MADV_KEEPONFORK`.
    KeepOnFork,
    /// `MADV_MERGEABLE` (hands the range to the kernel's KSM).
    #[cfg(feature = "testing")]
    KernelMergeable,
}

/// `madvise` with advice that changes no content.
pub fn advise(range: PageRange, hint: Hint) -> Result<(), SysError> {
    let (advice, op) = match hint {
        Hint::DontFork => (Advice::LinuxDontFork, "madvise(MADV_DONTFORK)"),
        Hint::DontDump => (Advice::LinuxDontDump, "madvise(MADV_DONTDUMP)"),
        Hint::HugePage => (Advice::LinuxHugepage, "madvise(MADV_HUGEPAGE)"),
        Hint::NoHugePage => (Advice::LinuxNoHugepage, "madvise(MADV_NOHUGEPAGE)"),
        Hint::DoFork => (Advice::LinuxDoFork, "madvise(MADV_DOFORK)"),
        Hint::DoDump => (Advice::LinuxDoDump, "madvise(MADV_DODUMP)"),
        Hint::WipeOnFork => (Advice::LinuxWipeOnFork, "madvise(MADV_WIPEONFORK)"),
        Hint::KeepOnFork => (Advice::LinuxKeepOnFork, "madvise(MADV_KEEPONFORK)"),
        #[cfg(feature = "testing")]
        Hint::KernelMergeable => (Advice::LinuxMergeable, "madvise(MADV_MERGEABLE)"),
    };
    // SAFETY: these advices change flags of the mapping, never its content.
    unsafe { rustix::mm::madvise(c(range.start()), range.len_bytes(), advice) }.op(op)
}

/// `mlock2(MLOCK_ONFAULT)`: pages of `range` are locked as they are faulted
/// in (no populate, so a private file mapping is not copied).
pub fn lock_on_fault(range: PageRange) -> Result<(), SysError> {
    // SAFETY: locking changes no content.
    unsafe { rustix::mm::mlock_with(c(range.start()), range.len_bytes(), rustix::mm::MlockFlags::ONFAULT) }
        .op("mlock2(MLOCK_ONFAULT)")
}

/// `munlock`.
pub fn unlock(range: PageRange) -> Result<(), SysError> {
    // SAFETY: munlock changes no content.
    unsafe { rustix::mm::munlock(c(range.start()), range.len_bytes()) }.op("munlock")
}

/// `mprotect(range, prot)`.
///
/// # Safety
/// Nothing may access the range in a way the new protection forbids.
#[cfg(feature = "testing")]
pub unsafe fn protect(range: PageRange, prot: rustix::mm::MprotectFlags) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { own(libc::SYS_mprotect, [range.start().get(), range.len_bytes(), prot.bits() as usize, 0, 0, 0]) }
        .op("mprotect")
        .map(drop)
}

/// `[start, end)` as pages, if both are page-aligned and it holds one.
fn page_range(start: usize, end: usize) -> Option<PageRange> {
    PageRange::from_bytes(start, end.checked_sub(start).filter(|&len| len > 0)?)
}

/// `mincore` of `range`: one byte per page into `vec` (resized to fit),
/// bit 0 set for a resident page.
fn mincore(range: PageRange, vec: &mut Vec<u8>) -> Result<(), SysError> {
    vec.clear();
    vec.resize(range.pages(), 0);
    // SAFETY: mincore writes one byte per page into `vec`, which has one per
    // page; it reads no memory of the range.
    let r = unsafe { libc::mincore(c(range.start()), range.len_bytes(), vec.as_mut_ptr()) };
    if r != 0 {
        return Err(SysError::new("mincore", super::last_errno()));
    }
    Ok(())
}

/// Whether every page of `range` is resident (`mincore`).
pub fn resident(range: PageRange) -> Result<bool, SysError> {
    let mut vec = Vec::new();
    mincore(range, &mut vec)?;
    Ok(vec.iter().all(|b| b & 1 == 1))
}

/// Bytes of `[start, end)` ranges resident in this process's memory
/// (`mincore`; the ranges page-aligned and mapped). A range that is not, or
/// that `mincore` refuses, counts nothing.
pub fn resident_bytes(ranges: &[(usize, usize)]) -> u64 {
    let mut vec = Vec::new();
    let mut total = 0;
    for range in ranges.iter().filter_map(|&(start, end)| page_range(start, end)) {
        if mincore(range, &mut vec).is_ok() {
            total += vec.iter().filter(|b| *b & 1 == 1).count() as u64 * PAGE_SIZE as u64;
        }
    }
    total
}

/// Gives the whole pages of `[start, end)` back to the kernel
/// (`MADV_DONTNEED`, as the engine's own call): for the preload library's
/// heap, which frees blocks of its own arenas this way. Addresses that are
/// not page-aligned, or a range holding no page, do nothing.
///
/// # Safety
/// The range's content may be discarded: nothing reads it before writing.
pub unsafe fn release_pages(start: usize, end: usize) -> Result<(), SysError> {
    match page_range(start, end) {
        // SAFETY: guaranteed by the caller.
        Some(range) => unsafe { dont_need(range) },
        None => Ok(()),
    }
}

/// Whether [`trim_heap`] calls `malloc_trim` (see [`set_heap_trim`]).
static TRIM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the engine's `malloc_trim` after unregistering off (or on again):
/// for a host whose Rust allocations do not come from the C library's heap
/// (the preload library's own heap), where trimming would only touch the
/// program's memory, under the engine's lock.
pub fn set_heap_trim(on: bool) {
    TRIM.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Returns the free memory at the top of malloc's heaps and inside them to
/// the system (glibc's `malloc_trim(0)`); a no-op with other C libraries.
pub fn trim_heap() {
    if !TRIM.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory malloc holds; it is
    // thread-safe and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsLine {
    /// Start address.
    pub start: usize,
    /// End address.
    pub end: usize,
    /// Permissions, e.g. `rw-p`.
    pub perms: String,
    /// File offset of the start (for file mappings).
    pub offset: u64,
    /// Inode number (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-path (`[heap]`), empty for anonymous memory.
    pub path: String,
}

impl MapsLine {
    /// Parses one line of `/proc/PID/maps` (or a mapping's header line in
    /// `/proc/PID/smaps`); `None` for anything else.
    pub fn parse(line: &str) -> Option<MapsLine> {
        let mut f = line.split_whitespace();
        let (range, perms, off, _dev, inode) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (a, b) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
        Some(MapsLine {
            start,
            end,
            perms: perms.to_string(),
            offset: u64::from_str_radix(off, 16).unwrap_or(0),
            inode: inode.parse().unwrap_or(0),
            path: f.collect::<Vec<_>>().join(" "),
        })
    }
}

/// The mappings overlapping `[start, end)`, from `/proc/self/maps` (read
/// only up to `end`: the kernel formats only what is read).
pub fn maps_in(start: usize, end: usize) -> Result<Vec<MapsLine>, SysError> {
    use std::io::BufRead;
    let f = std::fs::File::open("/proc/self/maps").map_err(|e| {
        SysError::new("open(/proc/self/maps)", rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
    })?;
    let mut out = Vec::new();
    for line in std::io::BufReader::with_capacity(1 << 16, f).lines() {
        let Ok(line) = line else { break };
        let Some(m) = MapsLine::parse(&line) else { continue };
        if m.start >= end {
            break;
        }
        if m.end > start {
            out.push(m);
        }
    }
    Ok(out)
}
