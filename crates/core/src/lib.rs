//! The pure core of samepage: Kernel Samepage Merging's algorithm with no
//! system calls and no `unsafe`.
//!
//! The names follow the kernel's `mm/ksm.c` and
//! `Documentation/admin-guide/mm/ksm.rst`:
//!
//! * [`rmap`]: one [`rmap::RmapItem`] per scanned page (8 bytes, allocated
//!   in chunks of 512 pages only where pages exist), holding the page's
//!   `oldchecksum` and its link into the trees.
//! * [`stable`]: the *stable tree* ([`stable::StableIndex`]), write-protected
//!   pool pages that are never discarded, with *chains* of *dups* once a page
//!   reaches `max_page_sharing` mappings.
//! * [`unstable`]: the *unstable tree* ([`unstable::UnstableIndex`]), pages
//!   whose checksum held still for one scan, thrown away after every full scan.
//! * [`pool`]: the stable pool's slot allocator ([`pool::StablePool`]).
//! * [`scan`]: the scanner ([`scan::Ksm`]): `ksm_do_scan`,
//!   `cmp_and_merge_page`, pruning of stable node chains, unmerge.
//! * [`space`]: the [`space::PageSpace`] trait the scanner drives; the Linux
//!   implementation lives in the `samepage` crate, a simulated one in [`sim`].
//! * [`tunables`] and [`counters`]: the sysfs names, defaults, validation
//!   and meanings.
//!
//! Hash-indexed tables replace the kernel's memcmp-ordered rbtrees: a lookup
//! is O(1), and a match is always confirmed by a full compare of the contents
//! inside the page space's write-protect window, so a hash alone never merges.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod advisor;
pub mod counters;
pub mod model;
pub mod page;
pub mod pool;
pub mod rmap;
pub mod scan;
pub mod sim;
pub mod space;
pub mod stable;
pub mod tunables;
pub mod unstable;

pub use counters::{Counters, RegionCounters};
pub use page::{page_hash, zero_page_hash, Domain, PageRef, RegionId, Slot, PAGE_SIZE};
pub use scan::Ksm;
pub use space::{Discard, Intent, IntentResult, PageSpace, PageState, Sample, SlotRelease, SpaceError, Target};
pub use tunables::{AdvisorMode, Run, TunableError, Tunables};
