//! Owned anonymous memory with volatile access, for regions the engine allocates.

use super::addr::{PageAddr, PageRange};
use super::mem;
use super::SysError;
use samepage_core::PAGE_SIZE;

/// A private anonymous mapping owned by the caller, unmapped on drop.
///
/// Its bytes may be written by several threads and remapped by the engine at
/// any time, so it hands out no references: [`AnonMapping::read`] and
/// [`AnonMapping::write`] copy with volatile accesses, and
/// [`AnonMapping::as_ptr`] is for callers who take the raw-pointer contract.
#[derive(Debug)]
pub struct AnonMapping {
    addr: usize,
    len: usize,
}

// SAFETY: the mapping is plain memory; all access is by volatile copies or
// raw pointers, which are sound to use from any thread.
unsafe impl Send for AnonMapping {}
// SAFETY: as above: `&AnonMapping` only allows volatile copies.
unsafe impl Sync for AnonMapping {}

/// An access outside the mapping.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("access at offset {offset} of {len} bytes is outside the region of {size} bytes")]
pub struct OutOfBounds {
    /// Offset asked for.
    pub offset: usize,
    /// Bytes asked for.
    pub len: usize,
    /// Size of the region.
    pub size: usize,
}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to whole pages) of fresh zeroed memory.
    pub fn new(len: usize) -> Result<AnonMapping, SysError> {
        let r = mem::map_anon(len.div_ceil(PAGE_SIZE).max(1))?;
        Ok(AnonMapping { addr: r.start().get(), len: r.len_bytes() })
    }

    /// Maps `len` bytes (rounded up to 2 MiB) of fresh zeroed memory at a
    /// 2 MiB-aligned address, with `MADV_HUGEPAGE`: transparent huge pages
    /// back it wherever the kernel's THP mode (`always` or `madvise`) allows.
    #[cfg(feature = "testing")]
    pub fn new_huge(len: usize) -> Result<AnonMapping, SysError> {
        use super::HUGE_PAGE_SIZE as HUGE;
        let len = len.div_ceil(HUGE).max(1) * HUGE;
        let raw = mem::map_anon((len + HUGE) / PAGE_SIZE)?;
        let addr = raw.start().get().next_multiple_of(HUGE);
        let head = (addr - raw.start().get()) / PAGE_SIZE;
        let body = len / PAGE_SIZE;
        if head > 0 {
            // SAFETY: the head of the range just mapped, nobody else's.
            unsafe { mem::unmap(raw.sub(0, head)) }?;
        }
        if head + body < raw.pages() {
            // SAFETY: the tail of the range just mapped, nobody else's.
            unsafe { mem::unmap(raw.sub(head + body, raw.pages())) }?;
        }
        let m = AnonMapping { addr, len };
        mem::advise(m.range(), mem::Hint::HugePage)?;
        Ok(m)
    }

    /// Reads the 8 bytes at `offset` (volatile).
    #[cfg(feature = "testing")]
    pub fn read_u64(&self, offset: usize) -> Result<u64, OutOfBounds> {
        if offset.checked_add(8).is_none_or(|e| e > self.len) || !offset.is_multiple_of(8) {
            return Err(OutOfBounds { offset, len: 8, size: self.len });
        }
        // SAFETY: inside the mapping and aligned; volatile, as other threads
        // and the engine may change the memory.
        Ok(unsafe { std::ptr::read_volatile((self.addr + offset) as *const u64) })
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Start address, page aligned.
    pub fn start(&self) -> PageAddr {
        PageAddr::new(self.addr).expect("mappings are page aligned")
    }

    /// The mapping's pages.
    pub fn range(&self) -> PageRange {
        PageRange::new(self.start(), self.len / PAGE_SIZE)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero (never: at least one page).
    #[cfg(feature = "testing")]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds { offset, len, size: self.len }),
        }
    }

    /// Copies `data` in at `offset` with volatile stores.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, data.len())?;
        let dst = self.addr + offset;
        if dst.is_multiple_of(8) && data.len().is_multiple_of(8) {
            for (i, chunk) in data.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
                let p = (dst + i * 8) as *mut u64;
                // SAFETY: inside the mapping (checked), 8-aligned.
                unsafe { p.write_volatile(v) };
            }
        } else {
            for (i, b) in data.iter().enumerate() {
                let p = (dst + i) as *mut u8;
                // SAFETY: inside the mapping (checked).
                unsafe { p.write_volatile(*b) };
            }
        }
        Ok(())
    }

    /// Copies bytes out from `offset` into `buf` with volatile loads.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        let src = self.addr + offset;
        if src.is_multiple_of(8) && buf.len().is_multiple_of(8) {
            for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
                let p = (src + i * 8) as *const u64;
                // SAFETY: inside the mapping (checked), 8-aligned.
                let v = unsafe { p.read_volatile() };
                chunk.copy_from_slice(&v.to_ne_bytes());
            }
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                let p = (src + i) as *const u8;
                // SAFETY: inside the mapping (checked).
                *b = unsafe { p.read_volatile() };
            }
        }
        Ok(())
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own the range; nothing refers to it after drop.
        let _ = unsafe { mem::unmap(self.range()) };
    }
}

#[cfg(feature = "testing")]
impl AnonMapping {
    /// `madvise(MADV_MERGEABLE)`: hands the mapping to the kernel's own KSM
    /// (for side-by-side comparisons with ksmd).
    pub fn advise_kernel_mergeable(&self) -> Result<(), SysError> {
        mem::advise(self.range(), mem::Hint::KernelMergeable)
    }

    /// `madvise(MADV_HUGEPAGE)`.
    pub fn advise_hugepage(&self) -> Result<(), SysError> {
        mem::advise(self.range(), mem::Hint::HugePage)
    }
}
