//! Mappings and volatile access to memory other threads may write.
//!
//! Registered memory belongs to the program: any of its threads may write a
//! page while the engine reads it. Such memory is never turned into a `&[u8]`
//! (that would be a data race in Rust's model): a page is copied with a raw
//! `copy_nonoverlapping` (memcpy) into an engine-owned buffer, and all hashing
//! and comparing works on the copy. A copy that raced a writer may mix old and
//! new bytes; the callers hash or compare again under write protection before
//! anything merges.

use super::{Op, SysError};
use samepage_core::PAGE_SIZE;
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

/// Copies the page at `src` into `dst` with volatile loads.
///
/// # Safety
/// `src` must be page-aligned and point to a readable mapped page for the
/// whole call. Concurrent writes are allowed: the copy may then mix old and
/// new bytes, which the callers detect by hashing or comparing again.
pub unsafe fn read_page(src: *const u8, dst: &mut PageBuf) {
    // SAFETY: `src` is readable for PAGE_SIZE bytes (caller), `dst` is our
    // own buffer of PAGE_SIZE bytes; they cannot overlap (ours is on the heap,
    // theirs in a registered region).
    unsafe { std::ptr::copy_nonoverlapping(src, dst.0.as_mut_ptr(), PAGE_SIZE) };
}

/// Whether a buffer is all zeros.
pub fn is_zero(buf: &PageBuf) -> bool {
    buf.0.chunks_exact(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Maps `len` bytes of `fd` at `offset` over `[addr, addr+len)`, private and
/// writable: reads share the file's pages, a write gets a private copy.
///
/// # Safety
/// `[addr, addr+len)` must be memory the engine may replace: a registered
/// range whose content equals the file's range (checked under write protection).
pub unsafe fn map_file_private_fixed(
    addr: usize,
    len: usize,
    fd: impl rustix::fd::AsFd,
    offset: u64,
) -> Result<(), SysError> {
    use rustix::mm::{MapFlags, ProtFlags};
    // SAFETY: MAP_FIXED replaces exactly the caller's range, which the caller
    // guarantees may be replaced.
    unsafe {
        rustix::mm::mmap(
            addr as *mut c_void,
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE | MapFlags::FIXED,
            fd,
            offset,
        )
    }
    .op("mmap(pool, MAP_PRIVATE|MAP_FIXED)")?;
    Ok(())
}

/// Maps fresh anonymous memory: over `[addr, addr+len)` when `fixed`, anywhere otherwise.
///
/// # Safety
/// With `fixed`, the range must be memory the engine may replace.
pub unsafe fn map_anon(addr: usize, len: usize, fixed: bool) -> Result<usize, SysError> {
    use rustix::mm::{MapFlags, ProtFlags};
    let flags = if fixed { MapFlags::PRIVATE | MapFlags::FIXED } else { MapFlags::PRIVATE };
    // SAFETY: without MAP_FIXED the kernel picks an unused range; with it the
    // caller guarantees the range may be replaced.
    let p = unsafe { rustix::mm::mmap_anonymous(addr as *mut c_void, len, ProtFlags::READ | ProtFlags::WRITE, flags) }
        .op("mmap(MAP_ANONYMOUS)")?;
    Ok(p as usize)
}

/// Moves the mapping at `[from, from+len)` over `[to, to+len)` (`mremap`
/// with `MREMAP_FIXED`): the pages move, nothing is copied.
///
/// # Safety
/// `from` must be one mapping the engine owns; `to` a range it may replace.
pub unsafe fn move_mapping(from: usize, len: usize, to: usize) -> Result<(), SysError> {
    // SAFETY: the caller owns `from` and may replace `to`.
    unsafe {
        rustix::mm::mremap_fixed(from as *mut c_void, len, len, rustix::mm::MremapFlags::MAYMOVE, to as *mut c_void)
    }
    .op("mremap(MREMAP_FIXED)")?;
    Ok(())
}

/// `madvise(MADV_DONTNEED)`: drops the pages of an anonymous range; they
/// read as zeros afterwards.
///
/// # Safety
/// The range must be anonymous memory whose content is zeros (or may be discarded).
pub unsafe fn discard(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, rustix::mm::Advice::LinuxDontNeed) }
        .op("madvise(MADV_DONTNEED)")
}

/// `madvise(MADV_POPULATE_WRITE)`: breaks copy-on-write (of zero pages and
/// shared pages) without changing content.
pub fn populate_write(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: POPULATE_WRITE never changes the content of a mapping; it only
    // makes each page private and writable, like a write of the same bytes.
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, rustix::mm::Advice::LinuxPopulateWrite) }
        .op("madvise(MADV_POPULATE_WRITE)")
}

/// `mprotect`: `read`/`write` access to `[addr, addr+len)`; neither is `PROT_NONE`.
///
/// # Safety
/// Nothing may access the range in a way the new protection forbids.
pub unsafe fn protect(addr: usize, len: usize, read: bool, write: bool) -> Result<(), SysError> {
    use rustix::mm::MprotectFlags;
    let mut prot = MprotectFlags::empty();
    if read {
        prot |= MprotectFlags::READ;
    }
    if write {
        prot |= MprotectFlags::WRITE;
    }
    // SAFETY: guaranteed by the caller.
    unsafe { rustix::mm::mprotect(addr as *mut c_void, len, prot) }.op("mprotect")
}

/// Moves the mapping at `[from, from+len)` to a fresh range the kernel picks
/// (reserved with `mmap`, then `mremap` with `MREMAP_FIXED`: a same-size
/// `MREMAP_MAYMOVE` alone never moves); returns the new address.
///
/// # Safety
/// Nothing may use `from` afterwards.
pub unsafe fn remap_anywhere(from: usize, len: usize) -> Result<usize, SysError> {
    // SAFETY: a fresh range of our own, replaced right below.
    let to = unsafe { map_anon(0, len, false) }?;
    // SAFETY: `to` is ours; the caller gives up `from`.
    if let Err(e) = unsafe { move_mapping(from, len, to) } {
        // SAFETY: `to` is still ours and unused.
        let _ = unsafe { unmap(to, len) };
        return Err(e);
    }
    Ok(to)
}

/// `madvise(MADV_NOHUGEPAGE)`: no transparent huge page will back the range.
pub fn no_hugepage(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: advice only; it never changes content.
    unsafe { rustix::mm::madvise(addr as *mut c_void, len, rustix::mm::Advice::LinuxNoHugepage) }
        .op("madvise(MADV_NOHUGEPAGE)")
}

/// Returns the free memory at the top of malloc's heaps and inside them to
/// the system (glibc's `malloc_trim(0)`); a no-op with other C libraries.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory malloc holds; it is
    // thread-safe and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmaps a range the engine owns.
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { rustix::mm::munmap(addr as *mut c_void, len) }.op("munmap")
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
    /// Inode number (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-path (`[heap]`), empty for anonymous memory.
    pub path: String,
}

/// The mappings overlapping `[start, end)`, from `/proc/self/maps`.
pub fn maps_in(start: usize, end: usize) -> Result<Vec<MapsLine>, SysError> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|e| {
        SysError::new("read(/proc/self/maps)", rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if b <= start || a >= end {
            continue;
        }
        out.push(MapsLine { start: a, end: b, perms: perms.to_string(), inode: inode.parse().unwrap_or(0), path });
    }
    Ok(out)
}

/// `read(2)` from `fd` straight into memory at `dst` (the kernel writes
/// into the page for the program, as a real program's I/O does).
pub fn read_into(fd: impl rustix::fd::AsFd, dst: usize, len: usize) -> rustix::io::Result<usize> {
    // SAFETY: the kernel checks the destination itself (EFAULT if unmapped);
    // the slice is only handed to the syscall and never read by Rust code.
    // Callers pass memory they own and that no Rust reference points to.
    let buf = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
    rustix::io::read(fd, buf)
}

/// `recv(2)` from `fd` straight into memory at `dst`.
pub fn recv_into(fd: impl rustix::fd::AsFd, dst: usize, len: usize) -> rustix::io::Result<usize> {
    // SAFETY: as in `read_into`.
    let buf = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
    rustix::net::recv(fd, buf, rustix::net::RecvFlags::empty()).map(|(n, _)| n)
}
