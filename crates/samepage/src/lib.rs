//! samepage: Kernel Samepage Merging in userspace.
//!
//! An [`Engine`] scans memory that the program marks mergeable, finds pages
//! with identical content, and maps one read-only copy (a page of its stable
//! pool) in their place; a write gets a private copy again through the
//! kernel's own copy-on-write. Tunables and counters carry the kernel's
//! names and meanings (`/sys/kernel/mm/ksm`).
//!
//! ```no_run
//! use samepage::{Engine, Run, Tunables};
//! let engine = Engine::new(Tunables { run: Run::Merge, ..Tunables::default() })?;
//! let region = engine.alloc_region(64 << 20)?; // 64 MiB of mergeable memory
//! region.write(0, b"hello");
//! let c = engine.counters()?;
//! println!("pages_sharing = {}", c.pages_sharing);
//! # Ok::<(), samepage::Error>(())
//! ```
//!
//! Layout: the pure algorithm is the `samepage-core` crate (re-exported as
//! [`core`]); the private `sys` module holds every `unsafe` block (userfaultfd, pagemap, the
//! memfd pool, mappings); [`Engine`] and [`Region`] are the API.
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod engine;
mod error;
mod region;
pub mod supervise;
#[allow(unsafe_code, reason = "the Linux layer: every unsafe block of samepage, each with its SAFETY comment")]
mod sys;
#[cfg(feature = "testing")]
#[allow(unsafe_code, reason = "typed entry points into `sys` whose contracts are the caller's")]
pub mod testing;

pub use engine::{set_own_memory_probe, Advice, DaemonLinkStatus, Engine, EngineInfo, Merged, MAX_REGIONS};
pub use error::Error;
pub use region::Region;
pub use samepage_core as core;
pub use samepage_core::{Counters, Discard, Domain, RegionCounters, RegionId, Run, Tunables, PAGE_SIZE};
pub use sys::forkguard::ForkHold;
pub use sys::mapping::OutOfBounds;
pub use sys::mem::{
    engine_mappings, maps_in, release_pages, resident_bytes, set_heap_trim, spawn_engine_thread, EngineMappingsHold,
    MapsLine,
};
pub use sys::space::SpaceStats;
pub use sys::uffd::UffdMode;
pub use sys::{SysError, HUGE_PAGE_SIZE};
