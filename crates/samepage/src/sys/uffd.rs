//! userfaultfd, reduced to what merging and unmerging need, one typed
//! wrapper per ioctl request.
//!
//! **Merging** moves the candidate pages out of the program's memory with
//! `UFFDIO_MOVE` (Linux 6.8), compares them where nobody else can write them,
//! maps the pool over the ones that match and moves the others back. The
//! move is the kernel's own atomic check that no device holds the page:
//! `mm/userfaultfd.c`'s `move_present_ptes()` refuses with `EBUSY` a folio
//! that `folio_maybe_dma_pinned()` (O_DIRECT or io_uring I/O in flight, an
//! io_uring fixed buffer, VFIO, RDMA) or that is not `PageAnonExclusive`
//! (shared with a forked child), and checks the pin again after clearing the
//! page-table entry. A write-protect window cannot do this: it only stops
//! *new* write faults, while a device that pinned the page earlier writes
//! straight into it, and replacing the page would send that write to a page
//! nobody reads (`mm/ksm.c`'s `write_protect_page()` refuses such pages by
//! comparing the folio's mapcount with its refcount). While its pages are
//! out, the window is registered `UFFDIO_REGISTER_MODE_MISSING`: a thread
//! that touches one of them, or the kernel on its behalf (`read(2)` into it,
//! a pin being taken), waits in the kernel until the window closes, instead
//! of finding an empty anonymous page and reading zeros.
//!
//! **Unmerging** copies pages that map the pool into fresh memory and moves
//! the copy over them (`mremap`), inside a write-protect window
//! (`UFFDIO_WRITEPROTECT`) so that a writer waits instead of writing to a page
//! being copied. Pool pages can only be pinned for reading (a pin for writing
//! copies the page first), so replacing them loses nothing.
//!
//! Two kinds of userfaultfd exist:
//!
//! * **full**: also catches accesses the kernel makes on the program's behalf
//!   (`read(2)` into the page, KVM's vCPU writes through get_user_pages): they
//!   wait for the window like a thread's access. Needs root,
//!   `CAP_SYS_PTRACE`, read-write access to `/dev/userfaultfd` (root-only by
//!   default), or `vm.unprivileged_userfaultfd=1`.
//! * **user-mode-only** (`UFFD_USER_MODE_ONLY`, what an unprivileged process
//!   gets): a kernel-mode access to a page inside its window is not delivered
//!   and fails with `EFAULT` (measured: `read(2)` returned EFAULT). samepage
//!   uses it only as a fallback that [`UffdMode`] reports.
//!
//! Features asked for: `UFFD_FEATURE_MOVE` (6.8), `UFFD_FEATURE_WP_UNPOPULATED`
//! (6.4: protection also covers page-table entries that are not populated)
//! and `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (so that ranges mapping the memfd pool
//! can be write-protected while they are copied).

use super::addr::{PageAddr, PageRange};
use super::{Op, SysError};
use bitflags::bitflags;
use linux_raw_sys::general as g;
use rustix::fd::{FromRawFd, OwnedFd};
use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode};
use std::ffi::c_void;

/// Which kind of userfaultfd the engine holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// Full mode: accesses by the kernel on the program's behalf wait for the window too.
    Full,
    /// `UFFD_USER_MODE_ONLY`: a syscall touching a page during its merge
    /// window fails with `EFAULT`. A fallback for unprivileged processes.
    UserModeOnly,
}

bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are delivered.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegisterMode: u64 {
        /// Faults on pages with no page-table entry wait for the monitor.
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Writes to write-protected entries wait for the monitor.
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
    }
}

/// The ioctl requests of a userfaultfd, each a type whose argument struct
/// fixes its opcode (the opcode is computed from the struct's size, so a
/// request cannot be paired with the wrong argument).
mod request {
    use super::*;

    /// Declares an ioctl request taking `&mut $arg`: `read_write` for
    /// `_IOWR` (the kernel reads and writes the struct), `read` for `_IOR`.
    macro_rules! request {
        ($(#[$doc:meta])* $name:ident, $dir:ident, $nr:expr, $arg:ty) => {
            $(#[$doc])*
            pub(super) struct $name<'a>(pub(super) &'a mut $arg);

            // SAFETY: the opcode is `_IOWR`/`_IOR(0xAA, nr, $arg)` as in
            // <linux/userfaultfd.h>, computed from `$arg`'s size; `as_ptr`
            // points to a live, exclusively borrowed `$arg` that the kernel
            // may read (and, for `_IOWR`, write) for the duration of the
            // call; the output is the integer return value only.
            unsafe impl Ioctl for $name<'_> {
                type Output = IoctlOutput;
                const IS_MUTATING: bool = true;
                fn opcode(&self) -> Opcode {
                    ioctl::opcode::$dir::<$arg>(0xAA, $nr)
                }
                fn as_ptr(&mut self) -> *mut c_void {
                    std::ptr::from_mut(self.0).cast()
                }
                unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
                    Ok(out)
                }
            }
        };
    }

    request!(
        /// `UFFDIO_API`: the handshake, features in and out.
        Api, read_write, 0x3F, g::uffdio_api
    );
    request!(
        /// `UFFDIO_REGISTER`: start delivering a range's faults.
        Register, read_write, 0x00, g::uffdio_register
    );
    request!(
        /// `UFFDIO_UNREGISTER`: stop delivering a range's faults (wakes its MISSING waiters).
        Unregister, read, 0x01, g::uffdio_range
    );
    request!(
        /// `UFFDIO_WAKE`: wake the threads waiting on a range.
        Wake, read, 0x02, g::uffdio_range
    );
    request!(
        /// `UFFDIO_WRITEPROTECT`: set or lift write protection.
        WriteProtect, read_write, 0x06, g::uffdio_writeprotect
    );
    request!(
        /// `UFFDIO_MOVE`: move pages between two anonymous ranges of this
        /// process, refusing pinned or shared ones.
        Move, read_write, 0x05, g::uffdio_move
    );

    /// `USERFAULTFD_IOC_NEW` (`_IO(0xAA, 0x00)` on `/dev/userfaultfd`): its
    /// argument is the flags integer itself, not a pointer.
    pub(super) struct NewFd(pub(super) usize);

    // SAFETY: the kernel takes the integer passed in the pointer slot as
    // flags and never dereferences it (IS_MUTATING is false); the output is
    // the new file descriptor, returned as the integer return value.
    unsafe impl Ioctl for NewFd {
        type Output = IoctlOutput;
        const IS_MUTATING: bool = false;
        fn opcode(&self) -> Opcode {
            ioctl::opcode::none(0xAA, 0x00)
        }
        fn as_ptr(&mut self) -> *mut c_void {
            self.0 as *mut c_void
        }
        unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
            Ok(out)
        }
    }
}

/// `UFFDIO_MOVE_MODE_DONTWAKE`: leave the range's waiters asleep (the window
/// wakes them when it closes).
const MOVE_MODE_DONTWAKE: u64 = 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP` (`1 << 0` in linux/userfaultfd.h).
const WRITEPROTECT_MODE_WP: u64 = 1;

const FEATURES: u64 =
    (g::UFFD_FEATURE_MOVE | g::UFFD_FEATURE_WP_UNPOPULATED | g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;

/// What a [`Uffd::move_pages`] call did: `moved` bytes from the start, then,
/// if it stopped early, the error at the first page not moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    /// Bytes moved from the start of the range.
    pub bytes: usize,
    /// Why it stopped before the end (`EBUSY`: pinned or shared; `ENOENT`:
    /// no page there; `EAGAIN`: try again), `None` when everything moved.
    pub stopped: Option<Errno>,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    mode: UffdMode,
}

impl Uffd {
    /// Opens the best userfaultfd this process may have: full mode through
    /// `/dev/userfaultfd` or the syscall, else user-mode-only.
    pub fn open() -> Result<Uffd, SysError> {
        Self::open_with(false)
    }

    /// As [`Uffd::open`]; with `remove_events`, also asks for
    /// `UFFD_FEATURE_EVENT_REMOVE`: a `madvise(MADV_DONTNEED)` (or `FREE`,
    /// `REMOVE`) on a registered range waits until the event is read. Only a
    /// userfaultfd with a reader may ask for it.
    pub fn open_with(remove_events: bool) -> Result<Uffd, SysError> {
        let features = FEATURES | if remove_events { u64::from(g::UFFD_FEATURE_EVENT_REMOVE) } else { 0 };
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        let mut last = None;
        if let Ok(dev) = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            let arg = (g::O_CLOEXEC | g::O_NONBLOCK) as usize;
            // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd only creates a descriptor.
            match unsafe { ioctl::ioctl(&dev, request::NewFd(arg)) } {
                Ok(fd) => {
                    // SAFETY: a successful USERFAULTFD_IOC_NEW returns a fresh fd that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    return Self::handshake(fd, UffdMode::Full, features);
                }
                Err(e) => last = Some(SysError::new("ioctl(USERFAULTFD_IOC_NEW)", e)),
            }
        }
        // SAFETY: userfaultfd(2) with valid flags only creates a descriptor.
        match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => return Self::handshake(fd, UffdMode::Full, features),
            Err(e) => last = last.or(Some(SysError::new("userfaultfd", e))),
        }
        let umo = flags | rustix::mm::UserfaultfdFlags::from_bits_retain(g::UFFD_USER_MODE_ONLY);
        // SAFETY: as above, with UFFD_USER_MODE_ONLY added.
        match unsafe { rustix::mm::userfaultfd(umo) } {
            Ok(fd) => Self::handshake(fd, UffdMode::UserModeOnly, features),
            Err(e) => Err(last.unwrap_or(SysError::new("userfaultfd(UFFD_USER_MODE_ONLY)", e))),
        }
    }

    fn handshake(fd: OwnedFd, mode: UffdMode, features: u64) -> Result<Uffd, SysError> {
        let mut api = g::uffdio_api { api: g::UFFD_API.into(), features, ioctls: 0 };
        // SAFETY: UFFDIO_API on a userfaultfd; the request type fixes the argument.
        unsafe { ioctl::ioctl(&fd, request::Api(&mut api)) }.op("ioctl(UFFDIO_API)")?;
        if api.features & features != features {
            return Err(SysError::new("ioctl(UFFDIO_API): MOVE, WP_UNPOPULATED and WP_HUGETLBFS_SHMEM", Errno::NOSYS));
        }
        Ok(Uffd { fd, mode })
    }

    /// The kind of userfaultfd held.
    pub fn mode(&self) -> UffdMode {
        self.mode
    }

    /// The descriptor (to poll and read messages from).
    pub fn fd(&self) -> rustix::fd::BorrowedFd<'_> {
        use rustix::fd::AsFd;
        self.fd.as_fd()
    }

    /// Registers `range` for the faults of `mode` (a range already
    /// registered with this userfaultfd takes the new mode). `EBUSY` when
    /// another userfaultfd has part of it.
    pub fn register(&self, range: PageRange, mode: RegisterMode) -> Result<(), SysError> {
        let mut reg = g::uffdio_register { range: uffd_range(range), mode: mode.bits(), ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER on our userfaultfd; the request type fixes the argument.
        unsafe { ioctl::ioctl(&self.fd, request::Register(&mut reg)) }.op("ioctl(UFFDIO_REGISTER)")?;
        Ok(())
    }

    /// Unregisters `range`; threads waiting on a missing page there wake up.
    pub fn unregister(&self, range: PageRange) -> Result<(), SysError> {
        let mut r = uffd_range(range);
        // SAFETY: UFFDIO_UNREGISTER on our userfaultfd; the request type fixes the argument.
        unsafe { ioctl::ioctl(&self.fd, request::Unregister(&mut r)) }.op("ioctl(UFFDIO_UNREGISTER)")?;
        Ok(())
    }

    /// Sets (`protect`) or lifts write protection on `range`, one attempt.
    /// Lifting wakes the writers that faulted on it. The kernel answers
    /// `EAGAIN` while an event of this userfaultfd waits to be read: the
    /// event's reader must not wait for itself, other callers retry.
    pub fn write_protect(&self, range: PageRange, protect: bool) -> Result<(), SysError> {
        let mut wp =
            g::uffdio_writeprotect { range: uffd_range(range), mode: if protect { WRITEPROTECT_MODE_WP } else { 0 } };
        // SAFETY: UFFDIO_WRITEPROTECT on our userfaultfd; the request type fixes the argument.
        unsafe { ioctl::ioctl(&self.fd, request::WriteProtect(&mut wp)) }.op("ioctl(UFFDIO_WRITEPROTECT)")?;
        Ok(())
    }

    /// Wakes the threads waiting on `range`.
    pub fn wake(&self, range: PageRange) -> Result<(), SysError> {
        let mut r = uffd_range(range);
        // SAFETY: UFFDIO_WAKE on our userfaultfd; the request type fixes the argument.
        unsafe { ioctl::ioctl(&self.fd, request::Wake(&mut r)) }.op("ioctl(UFFDIO_WAKE)")?;
        Ok(())
    }

    /// Moves the pages of `src` to `dst` (same length), without waking
    /// anyone. `dst` must be registered with this userfaultfd and hold no
    /// page; both private anonymous memory with the same protection and
    /// mlock state. Stops at the first page it cannot move and says why.
    ///
    /// # Safety
    /// The pages of `src` leave it: `src` must be memory the engine may
    /// empty (a range of a registered region inside a `MISSING` window, or
    /// the engine's own scratch), and `dst` memory whose pages it may fill.
    pub unsafe fn move_pages(&self, dst: PageAddr, src: PageAddr, pages: usize) -> Moved {
        let len = pages * crate::PAGE_SIZE;
        let mut mv = g::uffdio_move {
            dst: dst.get() as u64,
            src: src.get() as u64,
            len: len as u64,
            mode: MOVE_MODE_DONTWAKE,
            move_: 0,
        };
        // SAFETY: UFFDIO_MOVE on our userfaultfd; the request type fixes the
        // argument; the caller may empty `src` and fill `dst`.
        match unsafe { ioctl::ioctl(&self.fd, request::Move(&mut mv)) } {
            Ok(_) => Moved { bytes: len, stopped: None },
            Err(e) => Moved { bytes: usize::try_from(mv.move_).unwrap_or(0).min(len), stopped: Some(e) },
        }
    }
}

fn uffd_range(range: PageRange) -> g::uffdio_range {
    g::uffdio_range { start: range.start().get() as u64, len: range.len_bytes() as u64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mem;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Register for write protection, protect, a write from another thread
    /// waits; unprotect, and the write lands.
    #[test]
    fn write_protect_round_trip() {
        let uffd = Uffd::open().unwrap();
        let range = mem::map_anon(1).unwrap();
        mem::populate_write(range).unwrap();
        uffd.register(range, RegisterMode::WP).unwrap();
        uffd.write_protect(range, true).unwrap();
        let addr = range.start().get();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                let p = (addr + 100) as *mut u8;
                // SAFETY: a page of the test's own mapping, alive until the
                // thread is joined; only this thread writes it.
                unsafe { p.write_volatile(0x5A) };
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!done.load(Ordering::SeqCst), "the write waits while the page is write-protected");
        let p = (addr + 100) as *const u8;
        // SAFETY: as above; reads are not held up by write protection.
        assert_eq!(unsafe { p.read_volatile() }, 0, "nothing written yet");
        uffd.write_protect(range, false).unwrap();
        writer.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // SAFETY: as above; the writer has finished.
        assert_eq!(unsafe { p.read_volatile() }, 0x5A, "the write landed once protection was lifted");
        uffd.unregister(range).unwrap();
        // SAFETY: the test's own mapping, unused from here.
        unsafe { mem::unmap(range) }.unwrap();
    }
}
