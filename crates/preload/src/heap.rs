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
        STARTS[n].store(p as usize, Ordering::Relaxed);
        ENDS[n].store(p as usize + size, Ordering::Relaxed);
        COUNT.store(n + 1, Ordering::Release);
        // SAFETY: the span is the mapping just made, owned by the heap from
        // now on and never unmapped.
        unsafe { talc.claim(Span::from_base_size(p.cast(), size)) }.map(|_| ())
    }
}

/// The allocator of every Rust allocation in the library.
#[global_allocator]
pub static HEAP: Talck<spin::Mutex<()>, MapMore> = Talc::new(MapMore).lock();

/// The arenas, as `(start, end)`.
pub fn chunks() -> Vec<(usize, usize)> {
    let n = COUNT.load(Ordering::Acquire);
    (0..n).map(|i| (STARTS[i].load(Ordering::Relaxed), ENDS[i].load(Ordering::Relaxed))).collect()
}
