//! The counters, with the kernel's names and meanings
//! (`/sys/kernel/mm/ksm/*` and `/proc/PID/ksm_stat`).

use crate::page::PAGE_SIZE;

/// Engine-wide counters. Field names and meanings are the kernel's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Counters {
    /// Stable pages (pool pages) that have at least one mapping.
    pub pages_shared: u64,
    /// Mappings of stable pages beyond the first of each: the pages saved.
    pub pages_sharing: u64,
    /// Pages in the unstable tree: unique so far, checked again every scan.
    pub pages_unshared: u64,
    /// Pages whose content changed since the previous visit (rmap items in
    /// no tree): `rmap_items - shared - sharing - unshared`, as the kernel computes it.
    pub pages_volatile: u64,
    /// Pages visited since the engine started.
    pub pages_scanned: u64,
    /// Visits smart_scan skipped (pages that kept failing to merge).
    pub pages_skipped: u64,
    /// Full passes over every registered region.
    pub full_scans: u64,
    /// Chains: stable contents that needed more than one copy because of `max_page_sharing`.
    pub stable_node_chains: u64,
    /// Dups: the copies hanging off chains.
    pub stable_node_dups: u64,
    /// Mappings moved from a sparse dup into a dup with room (`stable_node_defrag`).
    pub stable_node_refiled: u64,
    /// Empty pages merged with the kernel's zero page (`use_zero_pages`);
    /// they carry no rmap item.
    pub ksm_zero_pages: u64,
    /// `(pages_sharing + ksm_zero_pages) * page_size - metadata_bytes`, in bytes
    /// (negative when the metadata costs more than merging saves).
    pub general_profit: i64,
    /// rmap items in use (pages with a checksum or a stable mapping).
    pub rmap_items: u64,
    /// Bytes of engine metadata (rmap item chunks, stable nodes, indexes):
    /// what `general_profit` charges, honestly counted from allocations.
    pub metadata_bytes: u64,
    /// Pages merged (into a stable page or the zero page) since the engine started.
    pub merges: u64,
    /// Merged pages made private again by unmerging (`run = 2`, unregister).
    pub unmerges: u64,
    /// Merged pages found written since their merge: copy-on-write faults
    /// the scanner has seen.
    pub cow_faults: u64,
    /// Merges the page space refused for the VMA budget (`vm.max_map_count`
    /// headroom). After the first refusal in a full scan, no merge that needs
    /// a mapping is tried again until the next one.
    pub vma_budget_skips: u64,
    /// Merges attempted whose full compare failed (the page changed in between).
    pub merge_races: u64,
    /// Merges or unmerges that failed with an error from the OS (ENOMEM, EPERM, ...).
    pub merge_errors: u64,
    /// Pool slots freed (hole punched) because nothing maps them any more.
    pub pool_slots_freed: u64,
    /// Pool slots waiting to be freed because something outside the engine's
    /// knowledge (a forked child) still maps them.
    pub pool_slots_pending: u64,
    /// Pool slots whose page was freed but that are never handed out again,
    /// because a private copy inside a pool mapping still refers to them
    /// (discarding that copy must read zeros, never another page).
    pub pool_slots_retired: u64,
    /// Transparent huge pages visited (each visit of a 2 MiB huge page counts).
    pub thp_scanned: u64,
    /// Huge pages split for merging: at least `thp_split_min_subpages` of
    /// their subpages would merge (with 1, what the kernel splits).
    pub thp_split: u64,
    /// Huge pages kept whole now: some subpages would merge, fewer than
    /// `thp_split_min_subpages`.
    pub thp_kept_whole: u64,
    /// Subpages that would merge in the huge pages kept whole: the memory
    /// left on the table (times the page size, in bytes) for the TLB's sake.
    pub thp_left_subpages: u64,
    /// Pages left unmerged because they are pinned (`FOLL_PIN`: O_DIRECT or
    /// io_uring I/O in flight, io_uring fixed buffers, VFIO, RDMA) or shared
    /// with another process, as `UFFDIO_MOVE` reported at their last merge
    /// attempt (the kernel's `write_protect_page` refuses the same pages).
    /// They are tried again at later visits.
    pub pages_pinned: u64,
    /// Merged pages the program wrote since: each is now a private copy
    /// inside a mapping of the pool. The engine never replaces such a page
    /// (no interface tells whether a device pins it), so it is not merged
    /// again; discarding it (`Engine::discard`) makes it ordinary memory.
    pub pages_pool_copies: u64,
    /// Pages of registered regions the engine stays away from because of an
    /// attribute merged memory could not keep (`MADV_WIPEONFORK`, `mseal`,
    /// another userfaultfd, a memory policy, a protection key, a VMA name).
    pub pages_excluded: u64,
}

impl Counters {
    /// Pages saved: `pages_sharing + ksm_zero_pages`.
    pub fn pages_saved(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }

    /// Derives the counters that follow from the stable tree's totals and
    /// the rmap items, as the kernel's do: `pages_shared`, `pages_sharing`,
    /// the chains and dups, `pages_volatile`, and `general_profit` (from
    /// `metadata_bytes`, set before).
    pub fn derive_from_stable(&mut self, s: &crate::stable::StableStats) {
        self.pages_shared = s.nodes;
        self.pages_sharing = s.mappings - s.nodes;
        self.pages_volatile = self.rmap_items.saturating_sub(s.mappings + self.pages_unshared);
        self.stable_node_chains = s.chains;
        self.stable_node_dups = s.dups;
        self.general_profit = (self.pages_saved() * PAGE_SIZE as u64) as i64 - self.metadata_bytes as i64;
    }

    /// The counters of several engines (or partitions) added up, field by
    /// field, except `full_scans`: each counts its own full scans, so the
    /// busiest one's. Derived counters need recomputing after.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Counters>) -> Counters {
        let mut sum = Counters::default();
        let mut max_full_scans = 0;
        for c in all {
            sum.add(c);
            max_full_scans = max_full_scans.max(c.full_scans);
        }
        sum.full_scans = max_full_scans;
        sum
    }

    /// Adds `other`'s counters to these, field by field (to sum the
    /// counters of several engines; derived ones need recomputing after).
    pub fn add(&mut self, other: &Counters) {
        self.pages_shared += other.pages_shared;
        self.pages_sharing += other.pages_sharing;
        self.pages_unshared += other.pages_unshared;
        self.pages_volatile += other.pages_volatile;
        self.pages_scanned += other.pages_scanned;
        self.pages_skipped += other.pages_skipped;
        self.full_scans += other.full_scans;
        self.stable_node_chains += other.stable_node_chains;
        self.stable_node_dups += other.stable_node_dups;
        self.stable_node_refiled += other.stable_node_refiled;
        self.ksm_zero_pages += other.ksm_zero_pages;
        self.general_profit += other.general_profit;
        self.rmap_items += other.rmap_items;
        self.metadata_bytes += other.metadata_bytes;
        self.merges += other.merges;
        self.unmerges += other.unmerges;
        self.cow_faults += other.cow_faults;
        self.vma_budget_skips += other.vma_budget_skips;
        self.merge_races += other.merge_races;
        self.merge_errors += other.merge_errors;
        self.pool_slots_freed += other.pool_slots_freed;
        self.pool_slots_pending += other.pool_slots_pending;
        self.pool_slots_retired += other.pool_slots_retired;
        self.thp_scanned += other.thp_scanned;
        self.thp_split += other.thp_split;
        self.thp_kept_whole += other.thp_kept_whole;
        self.thp_left_subpages += other.thp_left_subpages;
        self.pages_pinned += other.pages_pinned;
        self.pages_pool_copies += other.pages_pool_copies;
        self.pages_excluded += other.pages_excluded;
    }

    /// The counters as `(kernel name, value)` pairs, in sysfs order.
    pub fn named(&self) -> Vec<(&'static str, i64)> {
        vec![
            ("pages_shared", self.pages_shared as i64),
            ("pages_sharing", self.pages_sharing as i64),
            ("pages_unshared", self.pages_unshared as i64),
            ("pages_volatile", self.pages_volatile as i64),
            ("pages_scanned", self.pages_scanned as i64),
            ("pages_skipped", self.pages_skipped as i64),
            ("full_scans", self.full_scans as i64),
            ("stable_node_chains", self.stable_node_chains as i64),
            ("stable_node_dups", self.stable_node_dups as i64),
            ("stable_node_refiled", self.stable_node_refiled as i64),
            ("ksm_zero_pages", self.ksm_zero_pages as i64),
            ("general_profit", self.general_profit),
            ("rmap_items", self.rmap_items as i64),
            ("metadata_bytes", self.metadata_bytes as i64),
            ("merges", self.merges as i64),
            ("unmerges", self.unmerges as i64),
            ("cow_faults", self.cow_faults as i64),
            ("vma_budget_skips", self.vma_budget_skips as i64),
            ("merge_races", self.merge_races as i64),
            ("merge_errors", self.merge_errors as i64),
            ("pool_slots_freed", self.pool_slots_freed as i64),
            ("pool_slots_pending", self.pool_slots_pending as i64),
            ("pool_slots_retired", self.pool_slots_retired as i64),
            ("thp_scanned", self.thp_scanned as i64),
            ("thp_split", self.thp_split as i64),
            ("thp_kept_whole", self.thp_kept_whole as i64),
            ("thp_left_subpages", self.thp_left_subpages as i64),
            ("thp_left_bytes", (self.thp_left_subpages * crate::PAGE_SIZE as u64) as i64),
            ("pages_pinned", self.pages_pinned as i64),
            ("pages_pool_copies", self.pages_pool_copies as i64),
            ("pages_excluded", self.pages_excluded as i64),
        ]
    }
}

/// Per-region counters, named as in `/proc/PID/ksm_stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RegionCounters {
    /// rmap items of the region's pages.
    pub ksm_rmap_items: u64,
    /// The region's pages merged with the kernel's zero page.
    pub ksm_zero_pages: u64,
    /// The region's pages that map a stable page.
    pub ksm_merging_pages: u64,
    /// `(ksm_merging_pages + ksm_zero_pages) * page_size - metadata bytes`
    /// of the region's rmap items (the kernel's formula with our real item size).
    pub ksm_process_profit: i64,
}

impl RegionCounters {
    pub(crate) fn with_profit(mut self, metadata_bytes: u64) -> Self {
        self.ksm_process_profit =
            ((self.ksm_merging_pages + self.ksm_zero_pages) * PAGE_SIZE as u64) as i64 - metadata_bytes as i64;
        self
    }
}
