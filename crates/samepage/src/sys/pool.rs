//! The stable pool: a memfd holding every stable page.
//!
//! A merged page is the pool page mapped `MAP_PRIVATE` at the program's
//! address ([`super::mem::map_file_private_fixed`]). Reads share the pool
//! page; any write, by any thread, by the kernel for the program, or by a
//! forked child, gets a private copy from the kernel's copy-on-write, and the
//! pool page never changes. So the stable tree stays stable by construction,
//! and if the engine stops or crashes every page stays correct.
//!
//! The engine keeps one `MAP_SHARED` view of the whole pool to fill and
//! compare slots. The view is `MADV_DONTFORK`, so a forked child does not
//! inherit it: then a pool page that is "exclusively mapped" (pagemap bit 56)
//! in the view is mapped by nothing else, and only such a page is freed
//! (`fallocate(PUNCH_HOLE)`): punching a page that something still maps would
//! zap that mapping, and it would read zeros.

use super::addr::{PageAddr, PageRange};
use super::mem::{self, PageBuf};
use super::pagemap::{PageMap, PM_MMAP_EXCLUSIVE, PM_PRESENT};
use super::{Op, SysError};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use samepage_core::{page_hash, Slot, PAGE_SIZE};

/// The memfd pool and the engine's view of it.
#[derive(Debug)]
pub struct MemfdPool {
    fd: OwnedFd,
    view: PageRange,
    slots: u64,
    /// Whether other processes map the memfd too (a daemon's partition).
    shared: bool,
}

impl MemfdPool {
    /// A pool of `slots` pages. The memfd is sparse and the view
    /// `MAP_NORESERVE`: only filled slots take memory.
    pub fn new(slots: u64) -> Result<MemfdPool, SysError> {
        let fd = rustix::fs::memfd_create("samepage-pool", rustix::fs::MemfdFlags::CLOEXEC).op("memfd_create")?;
        rustix::fs::ftruncate(&fd, slots * PAGE_SIZE as u64).op("ftruncate(pool)")?;
        let mut pool = Self::from_fd(fd, slots)?;
        pool.shared = false;
        Ok(pool)
    }

    /// A pool on an existing memfd of `slots` pages (a daemon's, shared by
    /// several processes).
    pub fn from_fd(fd: OwnedFd, slots: u64) -> Result<MemfdPool, SysError> {
        let len = slots * PAGE_SIZE as u64;
        let size = rustix::fs::fstat(&fd).op("fstat(pool)")?.st_size;
        if u64::try_from(size).ok() != Some(len) {
            return Err(SysError::new("the pool memfd's size is not its slots' (fstat)", rustix::io::Errno::INVAL));
        }
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh shared mapping of the pool memfd at an address the
        // kernel picks; nothing else refers to it.
        let view = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                &fd,
                0,
            )
        }
        .op("mmap(pool view)")? as usize;
        let view = PageRange::new(PageAddr::new(view).expect("mmap returns page-aligned addresses"), slots as usize);
        // DONTFORK keeps children from inheriting the view.
        mem::advise(view, mem::Hint::DontFork)?;
        super::forkguard::install();
        Ok(MemfdPool { fd, view, slots, shared: true })
    }

    /// Whether other processes map the memfd too (a daemon's partition).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The memfd, to map slots from.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// How the pool's memfd appears in `/proc/PID/maps`: its name and inode,
    /// to find other processes (forked children) that map it.
    pub fn identity(&self) -> String {
        let ino = rustix::fs::fstat(&self.fd).map(|st| st.st_ino).unwrap_or(0);
        format!(" {ino} ")
    }

    /// The memfd's inode number (how `/proc/self/maps` names its mappings).
    pub fn inode(&self) -> u64 {
        rustix::fs::fstat(&self.fd).map(|st| st.st_ino).unwrap_or(0)
    }

    /// Address of a slot in the engine's view.
    pub fn slot_addr(&self, slot: Slot) -> PageAddr {
        assert!(slot.0 < self.slots, "slot {} outside the pool", slot.0);
        self.view.page(slot.0 as usize)
    }

    /// Copies the page at `src` into the empty `slot`; returns the hash of
    /// what was copied (a racing writer can make it differ from the page's).
    ///
    /// # Safety
    /// `src` must be a readable mapped page for the duration of the call.
    pub unsafe fn fill(&mut self, slot: Slot, src: PageAddr, buf: &mut PageBuf) -> u64 {
        // SAFETY: guaranteed by the caller.
        unsafe { mem::read_page(src, buf) };
        let h = page_hash(&buf.0);
        let dst = self.slot_addr(slot).ptr();
        // SAFETY: the slot is empty and this process's (its pool, or a slot
        // the daemon allocated to it): no mapping shares it yet; it lies
        // inside our view; the buffer is our own.
        unsafe { std::ptr::copy_nonoverlapping(buf.0.as_ptr(), dst, PAGE_SIZE) };
        h
    }

    /// Whether filled `slot` holds `bytes`. A pool of this process's own is
    /// compared in place: only [`MemfdPool::fill`] writes it, into empty
    /// slots, through `&mut self`. A shared one is copied into `copy` first:
    /// other processes fill slots of their own and free dead ones
    /// (`PUNCH_HOLE`) through mappings of the same memfd.
    pub fn slot_equals(&self, slot: Slot, bytes: &[u8], copy: &mut PageBuf) -> bool {
        if self.shared {
            self.read_slot(slot, copy);
            return copy.0[..] == *bytes;
        }
        // SAFETY: inside our view; nothing but `fill` (through `&mut self`,
        // impossible while this borrow lives) writes a pool of our own.
        let mine = unsafe { std::slice::from_raw_parts(self.slot_addr(slot).ptr().cast_const(), PAGE_SIZE) };
        mine == bytes
    }

    /// Copies a slot's bytes into `buf` (a copy, not a slice: see
    /// [`MemfdPool::slot_equals`]).
    pub fn read_slot(&self, slot: Slot, buf: &mut PageBuf) {
        // SAFETY: inside our view, mapped for the pool's life; `read_page`
        // allows concurrent writes.
        unsafe { mem::read_page(self.slot_addr(slot), buf) }
    }

    /// Drops the view's page-table entries (the pool keeps its pages): in a
    /// pool other processes map too, a page this view touched once would
    /// otherwise count as one more mapping in their checks.
    pub fn zap_view(&self) -> Result<(), SysError> {
        // SAFETY: a shared mapping of the memfd: MADV_DONTNEED drops page
        // table entries only; the pages stay in the memfd.
        unsafe { mem::dont_need(self.view) }
    }

    /// Frees a slot's page if nothing but the view maps it; returns whether it did.
    pub fn release(&mut self, slot: Slot, pagemap: &PageMap) -> Result<bool, SysError> {
        let addr = self.slot_addr(slot);
        let mut e = pagemap.entry(addr)?;
        if e & PM_PRESENT == 0 {
            // Fault the view's mapping in, so that bit 56 speaks for the page.
            // SAFETY: inside our view; a read never changes the page.
            let _ = unsafe { addr.ptr().cast_const().read_volatile() };
            e = pagemap.entry(addr)?;
        }
        if e & PM_PRESENT != 0 && e & PM_MMAP_EXCLUSIVE == 0 {
            return Ok(false);
        }
        rustix::fs::fallocate(
            &self.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            slot.0 * PAGE_SIZE as u64,
            PAGE_SIZE as u64,
        )
        .op("fallocate(PUNCH_HOLE)")?;
        Ok(true)
    }
}

impl Drop for MemfdPool {
    fn drop(&mut self) {
        // SAFETY: the view is ours and nothing uses it after drop.
        let _ = unsafe { mem::unmap(self.view) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocated(pool: &MemfdPool) -> u64 {
        rustix::fs::fstat(pool.fd()).map(|st| st.st_blocks as u64 * 512).unwrap()
    }

    /// A slot filled, mapped over a page of the program's, released: refused
    /// while mapped, then the memfd's memory is given back.
    #[test]
    fn fill_map_release() {
        let mut pool = MemfdPool::new(16).unwrap();
        let pagemap = PageMap::open().unwrap();
        assert_eq!(allocated(&pool), 0, "a fresh pool is sparse");
        let src = mem::map_anon(1).unwrap();
        let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        // SAFETY: the test's own fresh page; nothing else refers to it.
        unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.start().ptr(), PAGE_SIZE) };
        let mut buf = PageBuf::new();
        // SAFETY: `src` is mapped and readable for the call.
        let h = unsafe { pool.fill(Slot(3), src.start(), &mut buf) };
        assert_eq!(h, page_hash(&pattern));
        let mut slot = PageBuf::new();
        pool.read_slot(Slot(3), &mut slot);
        assert_eq!(&slot.0[..], &pattern[..]);
        assert_eq!(allocated(&pool), PAGE_SIZE as u64, "one page of the memfd holds memory");

        let dst = mem::map_anon(1).unwrap();
        // SAFETY: the test's own page, replaced by the pool page.
        unsafe { mem::map_file_private_fixed(dst, pool.fd(), 3 * PAGE_SIZE as u64) }.unwrap();
        let mut got = PageBuf::new();
        // SAFETY: `dst` is mapped (the pool page) and readable.
        unsafe { mem::read_page(dst.start(), &mut got) };
        assert_eq!(&got.0[..], &pattern[..], "the mapping reads the slot");
        assert!(!pool.release(Slot(3), &pagemap).unwrap(), "a slot still mapped is not freed");
        assert_eq!(allocated(&pool), PAGE_SIZE as u64);

        // SAFETY: the test's own mapping, unused from here.
        unsafe { mem::unmap(dst) }.unwrap();
        assert!(pool.release(Slot(3), &pagemap).unwrap());
        assert_eq!(allocated(&pool), 0, "the page went back to the system");
        pool.read_slot(Slot(3), &mut slot);
        assert!(slot.0.iter().all(|&b| b == 0), "a freed slot reads zeros");
        // SAFETY: as above.
        unsafe { mem::unmap(src) }.unwrap();
    }
}
