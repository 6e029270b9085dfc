//! The Linux layer. Every `unsafe` block of samepage lives below this module,
//! each with a `// SAFETY:` comment.
//!
//! * [`uffd`]: typed userfaultfd ioctls (open, API handshake, register,
//!   write-protect) for the merge window.
//! * [`pagemap`]: `PAGEMAP_SCAN` (with the `/proc/self/pagemap` fallback).
//! * [`mapping`]: [`mapping::AnonMapping`], owned mergeable memory with volatile access.
//! * [`mem`]: mappings (`mmap`, `mremap`, `madvise`) and volatile page access.
//! * [`pool`]: the stable pool, a memfd whose pages are mapped `MAP_PRIVATE`.
//! * [`vma`]: the `vm.max_map_count` budget.
//! * [`fault`]: fault injection for tests.
//! * [`seccomp`]: the user-notification filter and its listener (typed ioctls).
//! * [`space`]: [`space::LinuxPageSpace`], the core's page space on real memory.

pub mod addr;
pub mod attrs;
pub mod breaker;
pub mod fault;
pub mod forkguard;
pub mod mapping;
pub mod mem;
pub mod pagemap;
pub mod pool;
#[cfg(feature = "testing")]
pub mod process;
pub mod seccomp;
pub mod space;
pub mod uffd;
pub mod vma;

use thiserror::Error;

/// Bytes of a transparent huge page (a PMD on x86_64): the core's fact.
pub use samepage_core::HUGE_PAGE_SIZE;

/// A system call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{op} failed: {errno}")]
pub struct SysError {
    /// What was attempted.
    pub op: &'static str,
    /// The kernel's answer.
    pub errno: rustix::io::Errno,
}

impl SysError {
    pub(crate) fn new(op: &'static str, errno: rustix::io::Errno) -> Self {
        SysError { op, errno }
    }
}

impl From<SysError> for samepage_core::SpaceError {
    fn from(e: SysError) -> Self {
        samepage_core::SpaceError::Os { op: e.op, errno: e.errno.raw_os_error() }
    }
}

/// The calling thread's `errno`, after a C library or `syscall(2)` call
/// that returned -1.
pub(crate) fn last_errno() -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Extension to tag rustix results with the operation.
pub(crate) trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, SysError>;
}

impl<T> Op<T> for rustix::io::Result<T> {
    fn op(self, op: &'static str) -> Result<T, SysError> {
        self.map_err(|e| SysError::new(op, e))
    }
}
