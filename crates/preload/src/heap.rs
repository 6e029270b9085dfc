//! The library's own heap, away from the program's.
//!
//! Under `prctl(PR_SET_MEMORY_MERGE)` every private anonymous mapping of the
//! program is registered, glibc's heap and arenas included. The engine's own
//! data must not be among them: a merged page the engine itself writes
//! faults to the engine's copy-on-write thread, which, if it is the writer
//! (or waits for a lock the writer holds), waits for itself. So every Rust
//! allocation of this library (the engine's trees, buffers, its threads'
//! closures) comes from [`talc`] arenas mapped here with raw system calls,
//! and [`chunks`] lists them for the sweep to leave alone.

use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering};
use talc::{OomHandler, Span, Talc, Talck};

/// At most this many arenas (each at least [`CHUNK`]; 256 × 16 MiB = 4 GiB
/// before the first doubling).
const MAX_CHUNKS: usize = 256;
const CHUNK: usize = 16 << 20;

static STARTS: [AtomicUsize; MAX_CHUNKS] = [const { AtomicUsize::new(0) }; MAX_CHUNKS];
static ENDS: [AtomicUsize; MAX_CHUNKS] = [const { AtomicUsize::new(0) }; MAX_CHUNKS];
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Maps a new arena when the heap is full.
pub struct MapMore;

impl OomHandler for MapMore {
    fn handle_oom(talc: &mut Talc<Self>, layout: Layout) -> Result<(), ()> {
        let n = COUNT.load(Ordering::Relaxed);
        if n >= MAX_CHUNKS {
            return Err(());
        }
        let size = (layout.size() + layout.align() + (64 << 10)).max(CHUNK << (n / 64)).next_multiple_of(4096);
        // SAFETY: a fresh private anonymous mapping where the kernel picks:
        // nothing is replaced. Raw system call (rustix), not the C library's
        // mmap, which is this library's own interposed symbol.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                size,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|_| ())?;
        // Small pages only: with transparent huge pages `always`, a first
        // touch would fault in 2 MiB at once, `MADV_DONTNEED` of freed
        // blocks would only split them, and khugepaged would collapse them
        // back. A failure leaves the default.
        // SAFETY: advice on the mapping just made; it changes no content.
        let _ = unsafe { rustix::mm::madvise(p, size, rustix::mm::Advice::LinuxNoHugepage) };
        STARTS[n].store(p as usize, Ordering::Relaxed);
        ENDS[n].store(p as usize + size, Ordering::Relaxed);
        COUNT.store(n + 1, Ordering::Release);
        // SAFETY: the span is the mapping just made, owned by the heap from
        // now on and never unmapped.
        unsafe { talc.claim(Span::from_base_size(p.cast(), size)) }.map(|_| ())
    }
}

/// The arenas' allocator (locked across `fork` by the library's atfork
/// handlers).
pub static HEAP: Talck<spin::Mutex<()>, MapMore> = Talc::new(MapMore).lock();

/// A freed block at least this large gives its whole pages back to the
/// kernel ([`Releasing`]).
const RELEASE_MIN: usize = 64 << 10;

/// The allocator of every Rust allocation in the library: [`HEAP`], giving
/// freed memory back.
///
/// `talc` keeps what is freed for the next allocation, and never returns it
/// to the kernel: an arena's pages, once written, stay in the process's
/// memory. Most of what the engine allocates large lives for one batch
/// (candidates, their checksums, replies: 100-280 KiB each at
/// `pages_to_scan` 4000), so a process kept its busiest batch's peak in
/// memory for good. Measured in three prefork Python workers
/// (`scripts/workers/compare.py --workers 3 --mib 16`): 293-388 pages of
/// each worker's arena present, against 0.7-1.0 MB allocated. That is memory
/// merging was meant to save, in every process: so a freed block of
/// [`RELEASE_MIN`] or more has its whole pages discarded (`MADV_DONTNEED`)
/// before `talc` takes it back. `talc` keeps its bookkeeping of a free block
/// at its two ends (a list node and the size at the bottom, the size again
/// at the top), never inside, so the pages strictly inside stay untouched
/// until the block is allocated again; they then read zeros, which an
/// allocation may hold.
pub struct Releasing;

/// The first and past-the-last page addresses strictly inside the block
/// `[ptr, ptr + size)`, keeping `talc`'s bottom bookkeeping out (a list node
/// and a size: three words, rounded up to 64 bytes).
fn whole_pages(ptr: usize, size: usize) -> (usize, usize) {
    const PAGE: usize = 4096;
    ((ptr + 64).next_multiple_of(PAGE), (ptr + size) / PAGE * PAGE)
}

// SAFETY: every call goes to `HEAP`, a `GlobalAlloc`, with the caller's
// arguments; `dealloc` first discards pages of the block being freed, which
// the caller gives up and nothing else uses yet.
unsafe impl std::alloc::GlobalAlloc for Releasing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { HEAP.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= RELEASE_MIN {
            release(whole_pages(ptr as usize, layout.size()));
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { HEAP.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < RELEASE_MIN {
            // SAFETY: the caller's contract, passed on.
            return unsafe { HEAP.realloc(ptr, layout, new_size) };
        }
        let Some(nn) = std::ptr::NonNull::new(ptr) else { return std::ptr::null_mut() };
        if new_size > layout.size() {
            // SAFETY: the caller's block and layout, growing.
            if let Ok(grown) = unsafe { HEAP.lock().grow_in_place(nn, layout, new_size) } {
                return grown.as_ptr();
            }
        } else {
            // Shrinking in place: the whole pages of the tail given up go
            // back first (past the new end, `talc`'s tag and the bookkeeping
            // of the gap it leaves, as in `dealloc`).
            if layout.size() - new_size >= RELEASE_MIN {
                release(whole_pages(ptr as usize + new_size + 16, layout.size() - new_size - 16));
            }
            // SAFETY: the caller's block and layout, shrinking.
            unsafe { HEAP.lock().shrink(nn, layout, new_size) };
            return ptr;
        }
        // A large block that cannot grow in place moves through `dealloc`,
        // which gives its pages back (`talc`'s own move would keep them).
        // SAFETY: the layout the caller's block had, with the new size,
        // which the caller guarantees does not overflow when rounded.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: two distinct live blocks, each at least as long as the
            // bytes copied; then the old block is freed with its layout.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            }
            // SAFETY: the caller's block, with its layout, no longer used.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

/// Discards the pages `[start, end)` of a block being given up to `talc`
/// (nothing if the block holds no whole page).
fn release((start, end): (usize, usize)) {
    // SAFETY: pages inside a block being freed (or a shrunk block's tail),
    // in an arena of this heap (private anonymous memory no engine
    // registers): nobody reads them again before `talc` hands them out anew,
    // and `talc` keeps nothing there (see `Releasing`). A failure only
    // leaves the pages in memory.
    let _ = unsafe { samepage::release_pages(start, end) };
}

#[global_allocator]
static RELEASING: Releasing = Releasing;

/// The arenas, as `(start, end)`.
pub fn chunks() -> Vec<(usize, usize)> {
    let n = COUNT.load(Ordering::Acquire);
    (0..n).map(|i| (STARTS[i].load(Ordering::Relaxed), ENDS[i].load(Ordering::Relaxed))).collect()
}

#[cfg(test)]
mod tests {
    use super::whole_pages;

    #[test]
    fn only_pages_strictly_inside_a_block_are_given_back() {
        assert_eq!(whole_pages(0x10000, 0x10000), (0x11000, 0x20000));
        assert_eq!(whole_pages(0x10fc0, 0x10000), (0x11000, 0x20000));
        assert_eq!(whole_pages(0x10fc1, 0x10000), (0x12000, 0x20000));
        assert_eq!(whole_pages(0x10010, 0x1ff0), (0x11000, 0x12000));
        let (s, e) = whole_pages(0x10010, 0xff0);
        assert!(s >= e, "no whole page inside: {s:#x}..{e:#x}");
    }

    /// Pages of `[addr, addr + pages * 4096)` present in this process's
    /// memory, from `/proc/self/pagemap` (bit 63), read into `buf`.
    fn present(f: &mut std::fs::File, addr: usize, buf: &mut [u8]) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start((addr / 4096 * 8) as u64)).unwrap();
        f.read_exact(buf).unwrap();
        buf.chunks_exact(8).filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1).count()
    }

    #[test]
    fn a_large_block_freed_leaves_the_process_memory() {
        const PAGES: usize = 256;
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut buf = vec![0u8; PAGES * 8];
        let block = vec![1u8; PAGES * 4096];
        let addr = block.as_ptr() as usize;
        assert_eq!(present(&mut f, addr, &mut buf), PAGES, "written pages are present");
        drop(block);
        // The first page keeps talc's bookkeeping; other tests' threads may
        // allocate a little of the block again meanwhile.
        let left = present(&mut f, addr, &mut buf);
        assert!(left <= 8, "{left} of {PAGES} pages still present after the block was freed");
    }

    #[test]
    fn a_large_block_shrunk_in_place_gives_its_tail_back() {
        const PAGES: usize = 256;
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut buf = vec![0u8; PAGES * 8];
        let mut block = vec![1u8; PAGES * 4096];
        let addr = block.as_ptr() as usize;
        assert_eq!(present(&mut f, addr, &mut buf), PAGES, "written pages are present");
        block.truncate(4096);
        block.shrink_to_fit();
        assert_eq!(block.as_ptr() as usize, addr, "shrunk in place");
        assert!(block.iter().all(|&b| b == 1), "the kept bytes are intact");
        let left = present(&mut f, addr, &mut buf);
        assert!(left <= 8, "{left} of {PAGES} pages still present after the block shrank to one page");
    }
}
