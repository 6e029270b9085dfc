//! The library's errors.

use crate::engine::MAX_REGIONS;
use crate::sys::SysError;
use samepage_core::{RegionId, SpaceError, TunableError};
use thiserror::Error;

/// Everything the engine's API can refuse or fail at.
#[derive(Debug, Error)]
pub enum Error {
    /// A tunable value the kernel would refuse.
    #[error(transparent)]
    Tunable(#[from] TunableError),
    /// The range is empty or not page aligned.
    #[error(
        "range {addr:#x}+{len:#x} is not page aligned or is empty: address and length must be non-zero multiples of {}",
        crate::PAGE_SIZE
    )]
    Unaligned {
        /// Start address.
        addr: usize,
        /// Length in bytes.
        len: usize,
    },
    /// The range is not (entirely) private anonymous read-write memory.
    #[error("range {addr:#x}..{end:#x} cannot be registered: {why}")]
    NotAnonymous {
        /// Start address.
        addr: usize,
        /// End address.
        end: usize,
        /// What is in the way (the offending mapping from /proc/self/maps).
        why: String,
    },
    /// The range overlaps a registered region.
    #[error("range {addr:#x}..{end:#x} overlaps registered region {} ({rstart:#x}..{rend:#x})", .region.0)]
    Overlap {
        /// Start address.
        addr: usize,
        /// End address.
        end: usize,
        /// The region it overlaps.
        region: RegionId,
        /// That region's start.
        rstart: usize,
        /// That region's end.
        rend: usize,
    },
    /// [`MAX_REGIONS`] (2^24) regions were registered over the engine's
    /// life (ids are never reused).
    #[error("too many registrations: the engine hands out {MAX_REGIONS} region ids in its life")]
    RegionIdsExhausted,
    /// The range does not lie inside one registered region.
    #[error("range {addr:#x}..{end:#x} does not lie inside one registered region")]
    NotRegistered {
        /// Start address.
        addr: usize,
        /// End address.
        end: usize,
    },
    /// No region with that id.
    #[error("no registered region {}", .0.0)]
    UnknownRegion(RegionId),
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Unmerging failed (usually too little free memory, as the kernel's
    /// EAGAIN/ENOMEM); nothing was lost and the region is still registered.
    #[error("unmerge failed, nothing lost, region still registered: {0}")]
    Unmerge(SpaceError),
    /// The page space refused (for example `EINVAL` discarding locked memory).
    #[error("{0}")]
    Space(SpaceError),
    /// The daemon could not be reached or refused (`ENOENT`/`ECONNREFUSED`
    /// when none listens at the socket).
    #[error("samepage daemon: {0}")]
    Daemon(#[from] samepage_daemon::client::ClientError),
    /// The engine thread panicked. Merged pages stay correct (they are
    /// ordinary copy-on-write mappings) but nothing merges any more.
    #[error("the engine thread failed ({0}); merged memory stays correct but no merging happens")]
    EngineFailed(String),
}

impl Error {
    /// The kernel's error number behind the error, as the kernel's own
    /// interface would have answered: `EINVAL` for a value a tunable refuses,
    /// `EBUSY` for `max_page_sharing` while pages are shared, `ENOMEM` or
    /// `EAGAIN` when unmerging lacks memory, the system call's own errno
    /// otherwise; `None` where no system call or tunable is involved.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Tunable(t) => Some(t.errno()),
            Error::Unaligned { .. } | Error::NotAnonymous { .. } | Error::Overlap { .. } => Some(libc::EINVAL),
            Error::NotRegistered { .. } | Error::UnknownRegion(_) => Some(libc::EINVAL),
            Error::RegionIdsExhausted => Some(libc::ENOMEM),
            Error::Sys(e) => Some(e.errno.raw_os_error()),
            Error::Unmerge(e) | Error::Space(e) => e.errno(),
            Error::Daemon(e) => e.errno(),
            Error::EngineFailed(_) => None,
        }
    }
}
