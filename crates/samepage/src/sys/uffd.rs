//! userfaultfd, reduced to what the merge window needs.
//!
//! The engine registers every mergeable range in write-protect mode. To merge
//! a page it write-protects it (`UFFDIO_WRITEPROTECT`), compares it with the
//! stable page, maps the stable page over it, and then lifts the protection of
//! the range, which wakes any writer that faulted meanwhile. A woken writer
//! retries its fault and, finding the pool page mapped `MAP_PRIVATE`, gets a
//! private copy from the kernel's copy-on-write: its write lands, after the
//! merge, never lost.
//!
//! Two kinds of userfaultfd exist:
//!
//! * **full**: also catches writes the kernel makes on the program's behalf
//!   (`read(2)` into the page, KVM's vCPU writes through get_user_pages): they
//!   block during the window like a thread's write. Needs root,
//!   `CAP_SYS_PTRACE`, read-write access to `/dev/userfaultfd` (root-only by
//!   default), or `vm.unprivileged_userfaultfd=1`.
//! * **user-mode-only** (`UFFD_USER_MODE_ONLY`, what an unprivileged process
//!   gets): a kernel-mode write into a page inside its window is not delivered
//!   and fails with `EFAULT` (measured: `read(2)` returned EFAULT). samepage
//!   uses it only as a fallback that [`UffdMode`] reports.
//!
//! Features asked for: `UFFD_FEATURE_WP_UNPOPULATED` (6.4: protection also
//! covers page-table entries that are not populated) and
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (so that ranges mapping the memfd pool can
//! be registered too: a copy-on-write page there may merge again later).

use super::{Op, SysError};
use linux_raw_sys::general as g;
use rustix::fd::{AsFd, OwnedFd};
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode};
use std::ffi::c_void;

/// Which kind of userfaultfd the engine holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// Full mode: writes by the kernel on the program's behalf wait for the window too.
    Full,
    /// `UFFD_USER_MODE_ONLY`: a syscall writing into a page during its merge
    /// window fails with `EFAULT`. A fallback for unprivileged processes.
    UserModeOnly,
}

/// An ioctl that passes a pointer to `T` and returns the ioctl's return value.
struct Call<'a, const OPCODE: Opcode, T> {
    arg: &'a mut T,
}

// SAFETY: `as_ptr` returns a pointer to a live, exclusively borrowed `T` of
// the layout the opcode expects (callers pick `T` from linux-raw-sys for
// exactly that opcode), and the output is only the integer return value.
unsafe impl<const OPCODE: Opcode, T> Ioctl for Call<'_, OPCODE, T> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        OPCODE
    }
    fn as_ptr(&mut self) -> *mut c_void {
        (self.arg as *mut T).cast()
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Runs ioctl `OPCODE` on `fd` with `arg`.
///
/// # Safety
/// `T` must be the argument type the kernel expects for `OPCODE`.
pub(crate) unsafe fn call<const OPCODE: Opcode, T>(fd: impl AsFd, arg: &mut T) -> rustix::io::Result<IoctlOutput> {
    // SAFETY: the caller guarantees `T` matches `OPCODE`; `arg` is valid for
    // reads and writes for the duration of the call.
    unsafe { ioctl::ioctl(fd, Call::<OPCODE, T> { arg }) }
}

const UFFDIO_API: Opcode = linux_raw_sys::ioctl::UFFDIO_API as Opcode;
const UFFDIO_REGISTER: Opcode = linux_raw_sys::ioctl::UFFDIO_REGISTER as Opcode;
const UFFDIO_UNREGISTER: Opcode = linux_raw_sys::ioctl::UFFDIO_UNREGISTER as Opcode;
const UFFDIO_WRITEPROTECT: Opcode = linux_raw_sys::ioctl::UFFDIO_WRITEPROTECT as Opcode;
const UFFDIO_WAKE: Opcode = linux_raw_sys::ioctl::UFFDIO_WAKE as Opcode;
/// `USERFAULTFD_IOC_NEW`, `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: Opcode = ioctl::opcode::none(0xAA, 0x00);

/// `UFFDIO_WRITEPROTECT_MODE_WP` (`1 << 0` in linux/userfaultfd.h).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

const FEATURES: u64 = (g::UFFD_FEATURE_WP_UNPOPULATED | g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM) as u64;

/// A userfaultfd in write-protect mode.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    mode: UffdMode,
}

impl Uffd {
    /// Opens the best userfaultfd this process may have: full mode through
    /// `/dev/userfaultfd` or the syscall, else user-mode-only.
    pub fn open() -> Result<Uffd, SysError> {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        let mut last = None;
        if let Ok(dev) = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            let arg = (g::O_CLOEXEC | g::O_NONBLOCK) as usize;
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer
            // argument itself; rustix passes `as_ptr()` through unchanged, so
            // we hand the value cast to a pointer, never dereferenced. It
            // returns a new file descriptor, which we take ownership of.
            let r = unsafe { ioctl::ioctl(&dev, IntArg::<USERFAULTFD_IOC_NEW>(arg as *mut c_void)) };
            match r {
                // SAFETY: a successful USERFAULTFD_IOC_NEW returns a fresh fd that nothing else owns.
                Ok(fd) => {
                    return Self::handshake(
                        unsafe { <OwnedFd as rustix::fd::FromRawFd>::from_raw_fd(fd) },
                        UffdMode::Full,
                    )
                }
                Err(e) => last = Some(SysError::new("ioctl(USERFAULTFD_IOC_NEW)", e)),
            }
        }
        // SAFETY: userfaultfd(2) with valid flags only creates a descriptor.
        match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => return Self::handshake(fd, UffdMode::Full),
            Err(e) => last = last.or(Some(SysError::new("userfaultfd", e))),
        }
        let umo = flags | rustix::mm::UserfaultfdFlags::from_bits_retain(g::UFFD_USER_MODE_ONLY);
        // SAFETY: as above, with UFFD_USER_MODE_ONLY added.
        match unsafe { rustix::mm::userfaultfd(umo) } {
            Ok(fd) => Self::handshake(fd, UffdMode::UserModeOnly),
            Err(e) => Err(last.unwrap_or(SysError::new("userfaultfd(UFFD_USER_MODE_ONLY)", e))),
        }
    }

    fn handshake(fd: OwnedFd, mode: UffdMode) -> Result<Uffd, SysError> {
        // SAFETY: uffdio_api is plain data; all-zero is a valid value.
        let mut api: g::uffdio_api = unsafe { std::mem::zeroed() };
        api.api = g::UFFD_API as u64;
        api.features = FEATURES;
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        unsafe { call::<UFFDIO_API, _>(&fd, &mut api) }.op("ioctl(UFFDIO_API)")?;
        if api.features & FEATURES != FEATURES {
            return Err(SysError::new(
                "ioctl(UFFDIO_API): WP_UNPOPULATED and WP_HUGETLBFS_SHMEM",
                rustix::io::Errno::NOSYS,
            ));
        }
        Ok(Uffd { fd, mode })
    }

    /// The kind of userfaultfd held.
    pub fn mode(&self) -> UffdMode {
        self.mode
    }

    /// Registers `[start, start+len)` for write-protect faults.
    pub fn register(&self, start: usize, len: usize) -> Result<(), SysError> {
        let mut reg = g::uffdio_register {
            range: g::uffdio_range { start: start as u64, len: len as u64 },
            mode: g::UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { call::<UFFDIO_REGISTER, _>(&self.fd, &mut reg) }.op("ioctl(UFFDIO_REGISTER)")?;
        Ok(())
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: usize, len: usize) -> Result<(), SysError> {
        let mut range = g::uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { call::<UFFDIO_UNREGISTER, _>(&self.fd, &mut range) }.op("ioctl(UFFDIO_UNREGISTER)")?;
        Ok(())
    }

    /// Sets (`protect`) or lifts write protection on a range. Lifting wakes
    /// the writers that faulted on it.
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> Result<(), SysError> {
        let mut wp = g::uffdio_writeprotect {
            range: g::uffdio_range { start: start as u64, len: len as u64 },
            mode: if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
        unsafe { call::<UFFDIO_WRITEPROTECT, _>(&self.fd, &mut wp) }.op("ioctl(UFFDIO_WRITEPROTECT)")?;
        Ok(())
    }

    /// Wakes writers waiting on a range (after the range was remapped).
    pub fn wake(&self, start: usize, len: usize) -> Result<(), SysError> {
        let mut range = g::uffdio_range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { call::<UFFDIO_WAKE, _>(&self.fd, &mut range) }.op("ioctl(UFFDIO_WAKE)")?;
        Ok(())
    }
}

/// An ioctl whose argument is an integer passed in the pointer slot, and whose
/// return value is the output.
struct IntArg<const OPCODE: Opcode>(*mut c_void);

// SAFETY: the pointer is an integer argument the kernel never dereferences
// (IS_MUTATING is false); the output is the integer return value.
unsafe impl<const OPCODE: Opcode> Ioctl for IntArg<OPCODE> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        OPCODE
    }
    fn as_ptr(&mut self) -> *mut c_void {
        self.0
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}
