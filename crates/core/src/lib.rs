//! The pure core of samepage: Kernel Samepage Merging's algorithm with no
//! system calls and no `unsafe`.
//!
//! Read it as the kernel's `mm/ksm.c` (`DOC: Overview`) and
//! `Documentation/admin-guide/mm/ksm.rst`: a scanner walks the pages of
//! registered regions, checks each against the *stable tree* (pages already
//! merged, never changing) and then the *unstable tree* (pages whose
//! checksum held still for a scan), and merges pages with equal content
//! into one read-only copy. Start at [`scan`] (`ksm_do_scan`), follow a page
//! into [`merge`] (`cmp_and_merge_page`), and out through [`batch`] to the
//! [`space::PageSpace`] that carries the merge out.
//!
//! Each concept has a type that owns its state, in a file named for it:
//!
//! | kernel (`mm/ksm.c`) | samepage | file |
//! |---|---|---|
//! | `ksm_do_scan`, `scan_get_next_rmap_item`, `ksm_scan` | [`Ksm::scan_batch`], the cursor | [`scan`] |
//! | `cmp_and_merge_page`, `try_to_merge_two_pages` | `Ksm::cmp_and_merge_pages` | [`merge`] |
//! | `stable_tree_search`, `stable_tree_insert`, `rmap_hlist_len` | [`stable::StableTree`], [`stable::StableOp`] | [`stable`] |
//! | `stable_node_chain`, `stable_node_dup`, `max_page_sharing` | chains and dups in [`stable::LocalStableTree`] | [`stable`] |
//! | `unstable_tree_search_insert`, `root_unstable_tree` | [`unstable::UnstableTree`], [`unstable::UnstableOp`] | [`unstable`] |
//! | `struct ksm_rmap_item`, `oldchecksum`, `calc_checksum` | [`rmap::RmapItem`], [`rmap::Link`] | [`rmap`] |
//! | `struct ksm_mm_slot`, `mm_slot` list | [`regions::Regions`] | [`regions`] |
//! | `ksm_pages_shared`/`_sharing`/`_unshared`, `ksm_rmap_items` | [`links::LinkTally`], [`Counters`] | [`links`], [`counters`] |
//! | `write_protect_page` + `replace_page` | one [`space::Intent`], carried out by [`PageSpace::merge`] | [`batch`], [`space`] |
//! | `break_cow`, `unmerge_ksm_pages` | [`PageSpace::unmerge`], [`Ksm::unmerge_all`] | [`unmerge`] |
//! | KSM pages in the page cache of nobody | pool slots: [`pool::StablePool`], [`pool::DeadSlots`] | [`pool`] |
//! | `stable_node_chains_prune_millisecs`, `stable_node_defrag` | [`Ksm::prune`] | [`defrag`] |
//! | `should_skip_rmap_item` (smart_scan) | `Ksm::should_skip` | [`scan`] |
//! | `scan_time_advisor` | [`advisor::scan_time_advisor`] | [`advisor`] |
//! | THP split on merge (no kernel tunable) | [`thp::HugePagePolicy`], `thp_split_min_subpages` | [`thp`] |
//! | ksm.rst's counting rule (`max_page_sharing`, `general_profit`), without merging | [`estimate::Census`], [`estimate::SharingRule`] | [`estimate`] |
//! | `/sys/kernel/mm/ksm/*` | [`Tunables`], [`Counters`] | [`tunables`], [`counters`] |
//!
//! Hash-indexed tables replace the kernel's memcmp-ordered rbtrees: a lookup
//! is O(1), and a match is always confirmed by a full compare of the contents
//! inside the page space's write-protect window, so a hash alone never merges.
//!
//! The stable tree, the unstable tree and the pool are traits taking
//! batches of commands and answering with replies (no references into them
//! are handed out), so a daemon can serve them to several processes; the
//! in-process implementations ([`stable::LocalStableTree`],
//! [`unstable::LocalUnstableTree`], [`pool::LocalPool`]) are the defaults.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod advisor;
pub mod batch;
pub mod counters;
pub mod defrag;
pub mod estimate;
pub mod links;
pub mod machine;
pub mod merge;
pub mod model;
pub mod page;
pub mod pool;
pub mod regions;
pub mod rmap;
pub mod scan;
pub mod shared;
pub mod sim;
pub mod space;
pub mod stable;
pub mod thp;
pub mod tunables;
pub mod unmerge;
pub mod unstable;

pub use counters::{Counters, RegionCounters};
pub use page::{
    page_hash, zero_page_hash, Domain, NodeId, PageRef, RegionId, Slot, HUGE_PAGE_SIZE, HUGE_PAGE_SUBPAGES, PAGE_SIZE,
};
pub use scan::Ksm;
pub use space::{Discard, Intent, IntentResult, PageSpace, PageState, Sample, SlotRelease, SpaceError, Target};
pub use tunables::{AdvisorMode, Run, TunableError, Tunables};
