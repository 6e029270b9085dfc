//! Page-aligned addresses and ranges: the only kind the Linux layer passes to
//! the kernel, so an unaligned address cannot reach an `mmap(MAP_FIXED)` or
//! an ioctl.

use crate::PAGE_SIZE;

/// A page-aligned address in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageAddr(usize);

impl PageAddr {
    /// `addr` if it is page aligned.
    pub fn new(addr: usize) -> Option<PageAddr> {
        addr.is_multiple_of(PAGE_SIZE).then_some(PageAddr(addr))
    }

    /// The page holding `addr`.
    pub fn containing(addr: usize) -> PageAddr {
        PageAddr(addr & !(PAGE_SIZE - 1))
    }

    /// The address.
    pub fn get(self) -> usize {
        self.0
    }

    /// As a pointer (for system calls and raw copies).
    pub fn ptr(self) -> *mut u8 {
        self.0 as *mut u8
    }

    /// `pages` pages further on.
    pub fn add_pages(self, pages: usize) -> PageAddr {
        PageAddr(self.0 + pages * PAGE_SIZE)
    }

    /// Whole pages from `earlier` to `self`.
    pub fn pages_since(self, earlier: PageAddr) -> usize {
        (self.0 - earlier.0) / PAGE_SIZE
    }
}

/// `pages` pages from a page-aligned start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: PageAddr,
    pages: usize,
}

impl PageRange {
    /// `pages` pages from `start`.
    pub fn new(start: PageAddr, pages: usize) -> PageRange {
        PageRange { start, pages }
    }

    /// `[addr, addr + len)` if both are page aligned and it does not wrap.
    pub fn from_bytes(addr: usize, len: usize) -> Option<PageRange> {
        let start = PageAddr::new(addr)?;
        addr.checked_add(len)?;
        len.is_multiple_of(PAGE_SIZE).then_some(PageRange { start, pages: len / PAGE_SIZE })
    }

    /// First page.
    pub fn start(self) -> PageAddr {
        self.start
    }

    /// One past the last page.
    pub fn end(self) -> PageAddr {
        self.start.add_pages(self.pages)
    }

    /// Pages.
    pub fn pages(self) -> usize {
        self.pages
    }

    /// Bytes.
    pub fn len_bytes(self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Pages `from..to` of this range (indices relative to its start).
    pub fn sub(self, from: usize, to: usize) -> PageRange {
        debug_assert!(from <= to && to <= self.pages);
        PageRange { start: self.start.add_pages(from), pages: to - from }
    }

    /// The address of page `i` of the range.
    pub fn page(self, i: usize) -> PageAddr {
        self.start.add_pages(i)
    }

    /// Whether `addr` lies inside.
    pub fn contains(self, addr: usize) -> bool {
        self.start.get() <= addr && addr < self.end().get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aligned_addresses_and_lengths_are_accepted() {
        assert!(PageAddr::new(4096).is_some());
        assert!(PageAddr::new(4097).is_none());
        assert!(PageRange::from_bytes(8192, 100).is_none());
        assert!(PageRange::from_bytes(usize::MAX - 4095, 8192).is_none());
        let r = PageRange::from_bytes(8192, 3 * 4096).unwrap();
        assert_eq!((r.pages(), r.end().get(), r.page(2).get()), (3, 5 * 4096, 4 * 4096));
        assert_eq!(r.sub(1, 3).start().get(), 3 * 4096);
        assert_eq!(PageAddr::containing(12_345).get(), 12_288);
    }
}
