//! What tests, the torture command and benchmarks need beyond the engine's
//! API (feature `testing`): memory owned outside any engine, the system
//! calls a program makes on its own memory while the engine merges it, fault
//! injection, and a forked child that checks its copy. Everything `unsafe`
//! still lives in the library's private Linux layer; these are its typed
//! entry points, with the contracts spelled out.

pub use crate::sys::fault::{clear as clear_faults, force_pagemap_fallback, inject, injected, Point};
pub use crate::sys::mapping::{AnonMapping, OutOfBounds};
pub use crate::sys::process::fork_check;
pub use crate::sys::vma::count_mappings;

use crate::sys::addr::{PageAddr, PageRange};
use crate::sys::{mem, SysError};

fn range(addr: usize, len: usize) -> PageRange {
    PageRange::from_bytes(addr, len).unwrap_or_else(|| panic!("{addr:#x}+{len:#x} is not page aligned"))
}

/// Fresh private anonymous memory of `len` bytes (whole pages) where the
/// kernel picks; returns its address.
pub fn map_anon(len: usize) -> Result<usize, SysError> {
    Ok(mem::map_anon(len.div_ceil(crate::PAGE_SIZE))?.start().get())
}

/// Maps fresh zeroed anonymous memory over `[addr, addr + len)`.
///
/// # Safety
/// Whatever the range held is gone: nothing may refer to it.
pub unsafe fn map_anon_fixed(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { mem::map_anon_fixed(range(addr, len)) }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { mem::unmap(range(addr, len)) }
}

/// Moves the mapping `[from, from + len)` over `to` (`mremap(MREMAP_FIXED)`).
///
/// # Safety
/// `from` must be one mapping of the caller's, `to` a range it may replace.
pub unsafe fn move_mapping(from: usize, len: usize, to: usize) -> Result<(), SysError> {
    let to = PageAddr::new(to).unwrap_or_else(|| panic!("{to:#x} is not page aligned"));
    // SAFETY: guaranteed by the caller.
    unsafe { mem::move_mapping(range(from, len), to) }
}

/// Moves the mapping `[from, from + len)` to a fresh range the kernel picks;
/// returns the new address.
///
/// # Safety
/// Nothing may use `from` afterwards.
pub unsafe fn remap_anywhere(from: usize, len: usize) -> Result<usize, SysError> {
    let to = mem::map_anon(len.div_ceil(crate::PAGE_SIZE))?;
    // SAFETY: `to` is ours; the caller gives up `from`.
    if let Err(e) = unsafe { mem::move_mapping(range(from, len), to.start()) } {
        // SAFETY: `to` is still ours and unused.
        let _ = unsafe { mem::unmap(to) };
        return Err(e);
    }
    Ok(to.start().get())
}

/// `mprotect` with read and/or write access (neither is `PROT_NONE`).
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
    unsafe { mem::protect(range(addr, len), prot) }
}

/// `madvise(MADV_DONTNEED)` on `[addr, addr + len)`, as a program calls it
/// itself (not through the engine).
///
/// # Safety
/// The range's content may be discarded.
pub unsafe fn dont_need(addr: usize, len: usize) -> Result<(), SysError> {
    // SAFETY: guaranteed by the caller.
    unsafe { mem::dont_need(range(addr, len)) }
}

/// `read(2)` from `fd` straight into memory at `dst` (the kernel writes into
/// the page for the program, as a real program's I/O does).
///
/// # Safety
/// `[dst, dst + len)` must be memory the caller may write and that no Rust
/// reference points to.
pub unsafe fn read_into(fd: impl rustix::fd::AsFd, dst: usize, len: usize) -> std::io::Result<usize> {
    use rustix::fd::AsRawFd;
    // SAFETY: the kernel writes at most `len` bytes at `dst`, which the
    // caller may write; no slice is formed over it.
    let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), dst as *mut libc::c_void, len) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// `recv(2)` from `fd` straight into memory at `dst`.
///
/// # Safety
/// As [`read_into`].
pub unsafe fn recv_into(fd: impl rustix::fd::AsFd, dst: usize, len: usize) -> std::io::Result<usize> {
    use rustix::fd::AsRawFd;
    // SAFETY: as in `read_into`.
    let n = unsafe { libc::recv(fd.as_fd().as_raw_fd(), dst as *mut libc::c_void, len, 0) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}
