//! Which pages are present, and what they map: `PAGEMAP_SCAN`.
//!
//! `PAGEMAP_SCAN` (an ioctl on `/proc/self/pagemap`, Linux 6.7) walks a range
//! and returns runs of pages with the same categories, stopping after
//! `max_pages` matching pages. samepage asks only for present pages that map
//! no file: a page still mapping its pool page (`PAGE_IS_FILE`) cannot have
//! changed since its merge, so it is not even reported. Of the rest it reads
//! `PAGE_IS_PFNZERO` (the kernel's zero page) and `PAGE_IS_HUGE`.
//! Unprivileged, one system call per batch.
//!
//! Where the ioctl is missing (before 6.7), `/proc/self/pagemap` is read
//! instead, 8 bytes per page: bit 63 present, bit 61 file-backed. It cannot
//! tell the zero page (the PFN is hidden from unprivileged readers), so zero
//! pages then read as private pages of zeros.
//!
//! The same file answers [`PageMap::entry`], whose bit 56 ("exclusively
//! mapped") tells the pool whether anything besides its own view still maps a
//! pool page, before it frees it.

use super::addr::PageAddr;
use super::{Op, SysError};
use crate::PAGE_SIZE;
use bitflags::bitflags;
use linux_raw_sys::general as g;
use rustix::fd::OwnedFd;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode};
use std::ffi::c_void;

/// Runs one `PAGEMAP_SCAN` call returns, and entries one fallback read takes.
const BATCH: usize = 512;
/// Bytes of one `/proc/self/pagemap` entry.
const ENTRY: usize = 8;

/// pagemap entry bits.
pub const PM_PRESENT: u64 = 1 << 63;
/// Page is file-backed or shared anonymous.
pub const PM_FILE: u64 = 1 << 61;
/// Page is mapped exactly once.
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;

bitflags! {
    /// `PAGE_IS_*`: the categories `PAGEMAP_SCAN` reports a page in.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Category: u64 {
        /// `PAGE_IS_PRESENT`: a page is mapped.
        const PRESENT = g::PAGE_IS_PRESENT as u64;
        /// `PAGE_IS_FILE`: the page is a file's (for samepage: a pool page).
        const FILE = g::PAGE_IS_FILE as u64;
        /// `PAGE_IS_PFNZERO`: the kernel's shared zero page.
        const PFNZERO = g::PAGE_IS_PFNZERO as u64;
        /// `PAGE_IS_HUGE`: part of a transparent huge page.
        const HUGE = g::PAGE_IS_HUGE as u64;
    }
}

/// A run of pages with the same categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// What the pages are.
    pub categories: Category,
}

/// `PAGEMAP_SCAN`, `_IOWR('f', 16, struct pm_scan_arg)`.
struct Scan<'a>(&'a mut g::pm_scan_arg);

// SAFETY: the opcode is `_IOWR('f', 16, struct pm_scan_arg)` as in
// <linux/fs.h>, computed from the argument's size; `as_ptr` points to a live,
// exclusively borrowed `pm_scan_arg` whose `vec`/`vec_len` the caller sets to
// memory it owns; the output is the integer return value.
unsafe impl Ioctl for Scan<'_> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        ioctl::opcode::read_write::<g::pm_scan_arg>(b'f', 16)
    }
    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::from_mut(self.0).cast()
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// `/proc/self/pagemap`.
#[derive(Debug)]
pub struct PageMap {
    fd: OwnedFd,
    has_scan: bool,
    regions: Vec<g::page_region>,
}

impl PageMap {
    /// Opens `/proc/self/pagemap` and probes for `PAGEMAP_SCAN` (unless
    /// tests force the fallback: `testing::force_pagemap_fallback`).
    pub fn open() -> Result<PageMap, SysError> {
        Self::open_with(!super::fault::pagemap_fallback_forced())
    }

    /// As [`PageMap::open`]; `use_scan = false` forces the `/proc/self/pagemap`
    /// reads that kernels before 6.7 get.
    pub fn open_with(use_scan: bool) -> Result<PageMap, SysError> {
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .op("open(/proc/self/pagemap)")?;
        let mut pm =
            PageMap { fd, has_scan: true, regions: vec![g::page_region { start: 0, end: 0, categories: 0 }; BATCH] };
        let probe = Box::new([0u8; PAGE_SIZE]);
        let addr = probe.as_ptr() as usize & !(PAGE_SIZE - 1);
        let mut out = Vec::new();
        if !use_scan || pm.scan(addr, addr + PAGE_SIZE, 1, &mut out).is_err() {
            pm.has_scan = false;
        }
        Ok(pm)
    }

    /// Whether `PAGEMAP_SCAN` is available.
    pub fn has_scan(&self) -> bool {
        self.has_scan
    }

    /// Appends the runs of present pages that map no file (private pages and
    /// the zero page; pages still mapping the pool are left out) in
    /// `[start, end)` to `out`, at most
    /// `max_pages` pages; returns where the walk stopped.
    pub fn scan(&mut self, start: usize, end: usize, max_pages: usize, out: &mut Vec<Run>) -> Result<usize, SysError> {
        if !self.has_scan {
            return self.scan_fallback(start, end, max_pages, out);
        }
        let mut pos = start;
        let mut left = max_pages as u64;
        while pos < end && left > 0 {
            let mut arg = g::pm_scan_arg {
                size: std::mem::size_of::<g::pm_scan_arg>() as u64,
                flags: 0,
                start: pos as u64,
                end: end as u64,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: left,
                // Present pages that do not map a file: a page still mapping
                // its pool page cannot have changed and is not reported at all.
                category_inverted: Category::FILE.bits(),
                category_mask: Category::FILE.bits(),
                category_anyof_mask: Category::PRESENT.bits(),
                return_mask: (Category::PRESENT | Category::FILE | Category::PFNZERO | Category::HUGE).bits(),
            };
            // SAFETY: PAGEMAP_SCAN on /proc/self/pagemap; `vec` points to
            // `vec_len` writable `page_region`s owned by `self.regions`, which
            // outlives the call.
            let n = unsafe { ioctl::ioctl(&self.fd, Scan(&mut arg)) }.op("ioctl(PAGEMAP_SCAN)")? as usize;
            for r in &self.regions[..n] {
                left -= (r.end - r.start) / PAGE_SIZE as u64;
                out.push(Run {
                    start: r.start as usize,
                    end: r.end as usize,
                    categories: Category::from_bits_truncate(r.categories),
                });
            }
            if arg.walk_end as usize <= pos {
                break;
            }
            pos = arg.walk_end as usize;
        }
        Ok(pos.min(end))
    }

    fn scan_fallback(
        &mut self,
        start: usize,
        end: usize,
        max_pages: usize,
        out: &mut Vec<Run>,
    ) -> Result<usize, SysError> {
        let mut buf = [0u64; BATCH];
        let mut pos = start;
        let mut found = 0;
        while pos < end {
            let n = ((end - pos) / PAGE_SIZE).min(buf.len());
            // SAFETY: u64 has no invalid bit patterns; viewing the array as
            // bytes for pread is sound (same allocation, exact length).
            let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), n * ENTRY) };
            let got = rustix::io::pread(&self.fd, bytes, entry_offset(pos)).op("pread(/proc/self/pagemap)")?;
            if got < ENTRY {
                break;
            }
            for (i, e) in buf[..got / ENTRY].iter().enumerate() {
                let addr = pos + i * PAGE_SIZE;
                // Present pages that map no file, as PAGEMAP_SCAN is asked.
                if e & PM_PRESENT == 0 || e & PM_FILE != 0 {
                    continue;
                }
                if found == max_pages {
                    return Ok(addr);
                }
                found += 1;
                // Every run of the fallback is just PRESENT: no zero page, no huge page.
                match out.last_mut() {
                    Some(r) if r.end == addr => r.end += PAGE_SIZE,
                    _ => out.push(Run { start: addr, end: addr + PAGE_SIZE, categories: Category::PRESENT }),
                }
            }
            pos += got / ENTRY * PAGE_SIZE;
        }
        Ok(end)
    }

    /// The pagemap entry of the page at `addr` (bits: [`PM_PRESENT`], [`PM_FILE`], [`PM_MMAP_EXCLUSIVE`]).
    pub fn entry(&self, addr: PageAddr) -> Result<u64, SysError> {
        let mut b = [0u8; ENTRY];
        rustix::io::pread(&self.fd, &mut b, entry_offset(addr.get())).op("pread(/proc/self/pagemap)")?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// Where the entry of the page at `addr` lies in `/proc/self/pagemap`.
fn entry_offset(addr: usize) -> u64 {
    (addr / PAGE_SIZE * ENTRY) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::addr::PageRange;
    use crate::sys::mem;
    use crate::sys::pool::MemfdPool;

    /// Four pages: written (private), read only (the zero page), never
    /// touched, and a pool page mapped over the fourth.
    struct Layout {
        range: PageRange,
        _pool: MemfdPool,
    }

    fn layout() -> Layout {
        let range = mem::map_anon(4).unwrap();
        // The pool mapping first: the three other pages stay one mapping of
        // their own and are not merged into a huge page.
        let mut pool = MemfdPool::new(4).unwrap();
        let mut buf = mem::PageBuf::new();
        // SAFETY: the first page of the test's own mapping, readable.
        unsafe { pool.fill(samepage_core::Slot(1), range.start(), &mut buf) };
        // SAFETY: the test's own page, replaced by the pool page.
        unsafe { mem::map_file_private_fixed(range.sub(3, 4), pool.fd(), PAGE_SIZE as u64) }.unwrap();
        mem::populate_write(range.sub(0, 1)).unwrap();
        mem::populate_read(range.sub(1, 2)).unwrap();
        mem::populate_read(range.sub(3, 4)).unwrap();
        Layout { range, _pool: pool }
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            // SAFETY: the test's own mapping, unused from here.
            let _ = unsafe { mem::unmap(self.range) };
        }
    }

    fn scan(pm: &mut PageMap, range: PageRange) -> Vec<(usize, Category)> {
        let mut runs = Vec::new();
        let end = pm.scan(range.start().get(), range.end().get(), 64, &mut runs).unwrap();
        assert_eq!(end, range.end().get());
        let base = range.start().get();
        runs.iter()
            .flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE).map(move |a| ((a - base) / PAGE_SIZE, r.categories)))
            .collect()
    }

    #[test]
    fn pagemap_scan_tells_private_zero_and_pool_pages_apart() {
        let mut pm = PageMap::open().unwrap();
        assert!(pm.has_scan(), "PAGEMAP_SCAN (Linux 6.7) on this kernel");
        let l = layout();
        assert_eq!(
            scan(&mut pm, l.range),
            vec![(0, Category::PRESENT), (1, Category::PRESENT | Category::PFNZERO)],
            "the pool page (file) and the untouched page are not reported"
        );
        let pool_entry = pm.entry(l.range.page(3)).unwrap();
        assert!(pool_entry & PM_PRESENT != 0 && pool_entry & PM_FILE != 0, "{pool_entry:#x}");
        assert_eq!(pm.entry(l.range.page(2)).unwrap() & PM_PRESENT, 0);
    }

    #[test]
    fn the_pagemap_fallback_reads_what_it_can() {
        let mut pm = PageMap::open_with(false).unwrap();
        assert!(!pm.has_scan());
        let l = layout();
        // /proc/self/pagemap cannot tell the zero page: it reads as private.
        assert_eq!(scan(&mut pm, l.range), vec![(0, Category::PRESENT), (1, Category::PRESENT)]);
        // `max_pages` stops the walk at the page after the last one reported.
        let mut runs = Vec::new();
        let end = pm.scan(l.range.start().get(), l.range.end().get(), 1, &mut runs).unwrap();
        assert_eq!(end, l.range.page(1).get());
        assert_eq!(runs.len(), 1);
    }
}
