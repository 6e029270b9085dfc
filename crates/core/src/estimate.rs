//! What merging would save: the counters the kernel's KSM reaches once it
//! has merged a given set of page contents, computed from content-hash
//! counts alone (nothing is merged).
//!
//! The rule is the kernel's (`Documentation/admin-guide/mm/ksm.rst`,
//! `max_page_sharing` and "Monitoring KSM profit"): `k` copies of one
//! content (`k >= 2`) become stable-node dups of at most `max_page_sharing`
//! (`m`) pages each, one KSM page per dup: `pages_shared += k/m + (k%m >= 2)`
//! and `pages_sharing += (k/m)*(m-1) + (k%m).saturating_sub(1)`, which is
//! `k - ceil(k/m)` pages freed. A remainder of one copy finds no partner in
//! a full dup and stays in the unstable tree (`pages_unshared`), like every
//! unique page. With `use_zero_pages`, pages of zeros are mapped to the
//! kernel's zero page instead of entering the stable tree: each one is freed
//! and counted in `ksm_zero_pages`.
//!
//! Profit (ksm.rst, "Monitoring KSM profit"): `general_profit =
//! ksm_saved_pages * sizeof(page) - all_rmap_items * sizeof(rmap_item)`,
//! where `ksm_saved_pages = pages_sharing + ksm_zero_pages` and
//! `all_rmap_items = pages_sharing + pages_shared + pages_unshared +
//! pages_volatile` (a page merged into the zero page keeps no rmap item
//! once the next scan passes it). `struct ksm_rmap_item` is 64 bytes on
//! 64-bit kernels ([`RMAP_ITEM_BYTES`]). Once merging has settled,
//! `pages_volatile` is 0.
//!
//! Frames already shared: after `fork()` a parent and its children map the
//! same page frames until one of them writes. ksmd scans each mapping (one
//! rmap item each), but a frame is never merged with itself
//! (`unstable_tree_search_insert()`: "Don't substitute a ksm page for a
//! forked page"): when all the mappings of a content are one frame, the
//! first stays in the unstable tree and the others are counted in
//! `pages_volatile`, and nothing is freed. When the content has other
//! frames too, every mapping merges and counts in `pages_sharing`, but only
//! frames are freed. So [`Estimate::pages_freed`] counts frames (memory
//! really freed), and the counters by kernel name count mappings, as the
//! kernel's do. With no frame mapped twice the two agree:
//! `pages_freed = pages_sharing + ksm_zero_pages`.
//!
//! With `smart_scan` (the default since 6.7) ksmd skips pages that failed
//! to merge for a while; the split of those between `pages_unshared` and
//! `pages_volatile` then moves from scan to scan, while their sum (rmap
//! items not merged) holds. The estimate gives the split of `smart_scan` 0.
//!
//! [`Census`] takes the content hashes of pages held by one or more holders
//! (processes), and the mappings of frames it has counted already
//! ([`Census::add_frame_mapped_again`]); [`Census::estimate`] yields the
//! [`EstimateCounters`] by kernel name, and a breakdown of the frames
//! freed: zero pages, duplicates inside one holder, duplicates across
//! holders, and per holder.

use crate::page::{zero_page_hash, PAGE_SIZE};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// `sizeof(struct ksm_rmap_item)` on a 64-bit kernel: what the kernel's
/// `general_profit` charges for every page it tracks.
pub const RMAP_ITEM_BYTES: u64 = 64;

/// The kernel's settings that decide how copies merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharingRule {
    /// `max_page_sharing`: the most pages one KSM page stands for (at least 2).
    max_page_sharing: u64,
    /// `use_zero_pages`: pages of zeros map the kernel's zero page.
    use_zero_pages: bool,
}

/// A [`SharingRule`] the kernel would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharingRuleError {
    /// `max_page_sharing` below 2 (the kernel refuses it with `EINVAL`).
    #[error("max_page_sharing {0} is too small: it must be at least 2")]
    MaxPageSharing(u64),
}

impl SharingRule {
    /// The rule for `max_page_sharing` (at least 2, as the kernel requires)
    /// and `use_zero_pages`.
    pub fn new(max_page_sharing: u64, use_zero_pages: bool) -> Result<SharingRule, SharingRuleError> {
        if max_page_sharing < 2 {
            return Err(SharingRuleError::MaxPageSharing(max_page_sharing));
        }
        Ok(SharingRule { max_page_sharing, use_zero_pages })
    }

    /// `max_page_sharing`.
    pub fn max_page_sharing(&self) -> u64 {
        self.max_page_sharing
    }

    /// `use_zero_pages`.
    pub fn use_zero_pages(&self) -> bool {
        self.use_zero_pages
    }

    /// `(pages_shared, pages_sharing)` of `k` copies of one content merged
    /// into the stable tree: `k/m + (k%m >= 2)` KSM pages standing for
    /// `(k/m)*(m-1) + (k%m - 1)` freed copies.
    pub fn stable(&self, k: u64) -> (u64, u64) {
        let m = self.max_page_sharing;
        if k < 2 {
            return (0, 0);
        }
        (k / m + u64::from(k % m >= 2), (k / m) * (m - 1) + (k % m).saturating_sub(1))
    }

    /// Copies among positions `from..to` (of one content's copies, in
    /// holder order) that merging frees: the copy at every multiple of
    /// `max_page_sharing` is kept (a dup's KSM page, or the lone remainder),
    /// the others are freed. Over `0..k` this is `pages_sharing` of `k` copies.
    fn freed_between(&self, from: u64, to: u64) -> u64 {
        let m = self.max_page_sharing;
        let kept = to.div_ceil(m) - from.div_ceil(m);
        (to - from) - kept
    }
}

impl Default for SharingRule {
    /// The kernel's defaults: `max_page_sharing` 256, `use_zero_pages` 0.
    fn default() -> SharingRule {
        SharingRule { max_page_sharing: 256, use_zero_pages: false }
    }
}

/// The kernel's counters once merging has settled, by their
/// `/sys/kernel/mm/ksm` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstimateCounters {
    /// `pages_shared`: KSM pages (stable-tree pages in use).
    pub pages_shared: u64,
    /// `pages_sharing`: pages that map a KSM page besides its first: pages freed.
    pub pages_sharing: u64,
    /// `pages_unshared`: pages scanned that stay unique (in the unstable tree).
    pub pages_unshared: u64,
    /// `pages_volatile`: mappings of a frame already in the unstable tree
    /// (shared since a fork), which ksmd never merges with themselves.
    pub pages_volatile: u64,
    /// `ksm_zero_pages`: pages mapped to the zero page (with `use_zero_pages`).
    pub ksm_zero_pages: u64,
    /// The rmap items the kernel keeps: `pages_shared + pages_sharing +
    /// pages_unshared + pages_volatile`.
    pub rmap_items: u64,
    /// `general_profit`: `(pages_sharing + ksm_zero_pages) * page size -
    /// rmap_items * sizeof(rmap_item)`, in bytes.
    pub general_profit: i64,
}

impl EstimateCounters {
    /// Pages freed: `pages_sharing + ksm_zero_pages` (ksm.rst's `ksm_saved_pages`).
    pub fn pages_saved(&self) -> u64 {
        self.pages_sharing + self.ksm_zero_pages
    }

    /// The counters as `(kernel name, value)` pairs, in sysfs order.
    pub fn named(&self) -> [(&'static str, i64); 6] {
        [
            ("pages_shared", self.pages_shared as i64),
            ("pages_sharing", self.pages_sharing as i64),
            ("pages_unshared", self.pages_unshared as i64),
            ("pages_volatile", self.pages_volatile as i64),
            ("ksm_zero_pages", self.ksm_zero_pages as i64),
            ("general_profit", self.general_profit),
        ]
    }
}

/// One holder's part of an [`Estimate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HolderEstimate {
    /// Frames of the holder counted: its pages, less those that map a frame
    /// counted already ([`HolderEstimate::mapped_again`]).
    pub pages: u64,
    /// Pages of the holder that map a frame an earlier holder (or an earlier
    /// page) counted already: scanned by the kernel, freeing nothing.
    pub mapped_again: u64,
    /// Frames of the holder that merging frees: of each content, the copies
    /// beyond the ones kept, counted in holder order (the first holder of a
    /// content keeps its first copy); every zero page with `use_zero_pages`.
    pub freed: u64,
    /// Frames merging this holder alone would free (its own duplicates and,
    /// with `use_zero_pages`, its zero pages).
    pub freed_alone: u64,
}

/// What merging would reach: the counters, and where the freed pages come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The rule the estimate follows.
    pub rule: SharingRule,
    /// The counters by kernel name (they count mappings).
    pub counters: EstimateCounters,
    /// Frames freed that hold zeros (mapped to the zero page with
    /// `use_zero_pages`, else merged as copies of the zero content).
    pub freed_zero: u64,
    /// Non-zero frames freed by merging each holder's pages among themselves.
    pub freed_within: u64,
    /// Non-zero frames freed only by merging across holders (the rest).
    pub freed_across: u64,
    /// Distinct contents counted.
    pub contents: u64,
    /// Per holder, in holder order.
    pub holders: Vec<HolderEstimate>,
}

impl Estimate {
    /// Frames merging frees: memory really given back, `freed_zero +
    /// freed_within + freed_across`. It is `pages_sharing + ksm_zero_pages`
    /// unless some frames were mapped more than once before merging.
    pub fn pages_freed(&self) -> u64 {
        self.freed_zero + self.freed_within + self.freed_across
    }

    /// Bytes saved net of the kernel's metadata: the frames freed less
    /// `sizeof(rmap_item)` for every rmap item kept (the kernel's
    /// `general_profit`, counting frames instead of mappings).
    pub fn net_saved_bytes(&self) -> i64 {
        (self.pages_freed() * PAGE_SIZE as u64) as i64 - (self.counters.rmap_items * RMAP_ITEM_BYTES) as i64
    }
}

/// Copies of one content, per holder (sorted by holder; most contents
/// have one holder, kept inline).
#[derive(Clone, Debug)]
enum Holders {
    One((u32, u64)),
    Many(Vec<(u32, u64)>),
}

impl Holders {
    fn add(&mut self, holder: u32, copies: u64) {
        match self {
            Holders::One((h, c)) if *h == holder => *c += copies,
            Holders::One(first) => {
                let mut v = vec![*first, (holder, copies)];
                v.sort_unstable_by_key(|&(h, _)| h);
                *self = Holders::Many(v);
            }
            Holders::Many(v) => match v.binary_search_by_key(&holder, |&(h, _)| h) {
                Ok(i) => v[i].1 += copies,
                Err(i) => v.insert(i, (holder, copies)),
            },
        }
    }

    fn as_slice(&self) -> &[(u32, u64)] {
        match self {
            Holders::One(pair) => std::slice::from_ref(pair),
            Holders::Many(v) => v,
        }
    }
}

/// A hasher for keys that are content hashes already (xxh3): passes them through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The contents of pages held by holders (processes, numbered from 0), by
/// 64-bit content hash ([`crate::page_hash`]): equal hashes count as equal
/// contents (a collision needs about 2^32 distinct pages), and the hash of
/// a page of zeros ([`zero_page_hash`]) as zeros.
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// Frames per content, per holder.
    contents: HashMap<u64, Holders, BuildHasherDefault<PassThrough>>,
    /// Mappings of frames counted already, per content (few: after a fork).
    again: HashMap<u64, u64, BuildHasherDefault<PassThrough>>,
    /// Frames per holder.
    pages: Vec<u64>,
    /// Mappings of frames counted already, per holder.
    mapped_again: Vec<u64>,
}

impl Census {
    /// An empty census.
    pub fn new() -> Census {
        Census::default()
    }

    /// Counts `copies` pages of content `hash` held by `holder`, each its own
    /// frame.
    pub fn add(&mut self, holder: u32, hash: u64, copies: u64) {
        if copies == 0 {
            return;
        }
        self.add_holder(holder);
        self.pages[holder as usize] += copies;
        match self.contents.entry(hash) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(holder, copies),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Holders::One((holder, copies)));
            }
        }
    }

    /// Counts a page of `holder` that maps a frame of content `hash` this
    /// census has counted already (with [`Census::add`]): the same frame
    /// mapped again, as after a fork. The kernel scans it; merging it frees
    /// nothing.
    pub fn add_frame_mapped_again(&mut self, holder: u32, hash: u64) {
        self.add_holder(holder);
        self.mapped_again[holder as usize] += 1;
        *self.again.entry(hash).or_default() += 1;
    }

    /// Makes sure holder `holder` exists (with no pages, if none were added).
    pub fn add_holder(&mut self, holder: u32) {
        let h = holder as usize;
        if self.pages.len() <= h {
            self.pages.resize(h + 1, 0);
            self.mapped_again.resize(h + 1, 0);
        }
    }

    /// What merging every page counted would reach under `rule`.
    pub fn estimate(&self, rule: SharingRule) -> Estimate {
        let zero = zero_page_hash();
        let mut holders: Vec<HolderEstimate> = self
            .pages
            .iter()
            .zip(&self.mapped_again)
            .map(|(&pages, &mapped_again)| HolderEstimate { pages, mapped_again, ..HolderEstimate::default() })
            .collect();
        let mut e = Estimate { rule, contents: self.contents.len() as u64, ..Estimate::default() };
        let c = &mut e.counters;
        for (&hash, copies) in &self.contents {
            let copies = copies.as_slice();
            // Frames of this content, and mappings (the kernel's rmap items).
            let frames: u64 = copies.iter().map(|&(_, n)| n).sum();
            let k = frames + self.again.get(&hash).copied().unwrap_or(0);
            if hash == zero && rule.use_zero_pages {
                // Every mapping is pointed at the zero page; every frame is freed.
                c.ksm_zero_pages += k;
                e.freed_zero += frames;
                for &(h, n) in copies {
                    holders[h as usize].freed += n;
                    holders[h as usize].freed_alone += n;
                }
                continue;
            }
            if frames == 1 {
                // One frame (maybe mapped by several processes): nothing to
                // merge it with; its first mapping stays in the unstable
                // tree, the others find themselves there (volatile).
                c.pages_unshared += 1;
                c.pages_volatile += k - 1;
                continue;
            }
            // Every mapping merges; frames are freed as copies, by the same
            // rule (a content mapped more than `max_page_sharing` times
            // through shared frames may keep a dup fewer than counted here).
            let (shared, sharing) = rule.stable(k);
            c.pages_shared += shared;
            c.pages_sharing += sharing;
            c.pages_unshared += k - shared - sharing;
            let sharing = rule.stable(frames).1;
            let mut at = 0;
            let mut alone = 0;
            for &(h, n) in copies {
                let he = &mut holders[h as usize];
                he.freed += rule.freed_between(at, at + n);
                let own = rule.stable(n).1;
                he.freed_alone += own;
                alone += own;
                at += n;
            }
            if hash == zero {
                e.freed_zero += sharing;
            } else {
                e.freed_within += alone;
                e.freed_across += sharing - alone;
            }
        }
        c.rmap_items = c.pages_shared + c.pages_sharing + c.pages_unshared + c.pages_volatile;
        c.general_profit = (c.pages_saved() * PAGE_SIZE as u64) as i64 - (c.rmap_items * RMAP_ITEM_BYTES) as i64;
        e.holders = holders;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::page_hash;
    use proptest::prelude::*;

    /// The kernel's rule, written out as ksm.rst states it.
    fn kernel(k: u64, m: u64) -> (u64, u64) {
        // Not the closed form under test: the copies fill stable dups of at
        // most `m` mappings each, one after the other; a lone copy left
        // over stays unshared.
        let (mut left, mut shared, mut sharing) = (k, 0, 0);
        while left >= 2 {
            let d = left.min(m);
            shared += 1;
            sharing += d - 1;
            left -= d;
        }
        (shared, sharing)
    }

    #[test]
    fn a_frame_mapped_again_is_scanned_but_frees_nothing() {
        let rule = SharingRule::default();
        // Content 1: one frame mapped by holders 0, 1, 2 (a fork): the
        // kernel keeps it unshared once and volatile twice.
        // Content 2: frames in holders 0 and 1, holder 2 maps holder 0's
        // again: three mappings merge (pages_sharing 2), one frame is freed.
        let mut c = Census::new();
        c.add(0, 1, 1);
        c.add_frame_mapped_again(1, 1);
        c.add_frame_mapped_again(2, 1);
        c.add(0, 2, 1);
        c.add(1, 2, 1);
        c.add_frame_mapped_again(2, 2);
        let e = c.estimate(rule);
        assert_eq!(
            e.counters,
            EstimateCounters {
                pages_shared: 1,
                pages_sharing: 2,
                pages_unshared: 1,
                pages_volatile: 2,
                ksm_zero_pages: 0,
                rmap_items: 6,
                general_profit: 2 * 4096 - 6 * 64,
            }
        );
        assert_eq!((e.pages_freed(), e.freed_across, e.freed_within), (1, 1, 0));
        assert_eq!(e.net_saved_bytes(), 4096 - 6 * 64);
        let per: Vec<(u64, u64, u64)> = e.holders.iter().map(|h| (h.pages, h.mapped_again, h.freed)).collect();
        assert_eq!(per, [(2, 0, 0), (1, 1, 1), (0, 2, 0)]);
        // Zeros with use_zero_pages: every mapping goes to the zero page,
        // every frame is freed.
        let zero = zero_page_hash();
        let mut z = Census::new();
        z.add(0, zero, 2);
        z.add_frame_mapped_again(1, zero);
        let e = z.estimate(SharingRule::new(256, true).unwrap());
        assert_eq!((e.counters.ksm_zero_pages, e.pages_freed(), e.counters.rmap_items), (3, 2, 0));
    }

    #[test]
    fn a_small_max_page_sharing_makes_chains() {
        let rule = SharingRule::new(3, false).unwrap();
        // 7 copies: dups of 3, 3 and a lone remainder.
        assert_eq!(rule.stable(7), (2, 4));
        // 8 copies: dups of 3, 3, 2.
        assert_eq!(rule.stable(8), (3, 5));
        assert_eq!(rule.stable(1), (0, 0));
        assert_eq!(SharingRule::new(1, false), Err(SharingRuleError::MaxPageSharing(1)));
        let mut c = Census::new();
        c.add(0, 7, 7);
        c.add(0, 9, 1);
        let e = c.estimate(rule);
        assert_eq!(
            e.counters,
            EstimateCounters {
                pages_shared: 2,
                pages_sharing: 4,
                pages_unshared: 2,
                pages_volatile: 0,
                ksm_zero_pages: 0,
                rmap_items: 8,
                general_profit: 4 * 4096 - 8 * 64,
            }
        );
    }

    #[test]
    fn zero_pages_go_to_the_zero_page_or_the_stable_tree() {
        let zero = page_hash(&[0u8; PAGE_SIZE]);
        let mut c = Census::new();
        c.add(0, zero, 5);
        c.add(1, zero, 2);
        c.add(1, 42, 1);
        let e = c.estimate(SharingRule::new(256, true).unwrap());
        assert_eq!((e.counters.ksm_zero_pages, e.counters.pages_shared, e.counters.pages_sharing), (7, 0, 0));
        assert_eq!((e.counters.pages_unshared, e.counters.rmap_items), (1, 1));
        assert_eq!(e.counters.general_profit, 7 * 4096 - 64);
        assert_eq!((e.freed_zero, e.holders[0].freed, e.holders[1].freed), (7, 5, 2));
        let e = c.estimate(SharingRule::default());
        assert_eq!((e.counters.ksm_zero_pages, e.counters.pages_shared, e.counters.pages_sharing), (0, 1, 6));
        assert_eq!((e.freed_zero, e.freed_within, e.freed_across), (6, 0, 0));
        // Holder 0 keeps the first copy.
        assert_eq!((e.holders[0].freed, e.holders[1].freed), (4, 2));
    }

    #[test]
    fn duplicates_within_and_across_holders() {
        let mut c = Census::new();
        // Content 1: 3 copies in holder 0, 2 in holder 1, 1 in holder 2.
        c.add(0, 1, 3);
        c.add(2, 1, 1);
        c.add(1, 1, 2);
        // Content 2: one copy in each of holders 0 and 2.
        c.add(0, 2, 1);
        c.add(2, 2, 1);
        let e = c.estimate(SharingRule::default());
        assert_eq!((e.counters.pages_shared, e.counters.pages_sharing), (2, 6));
        // Alone: holder 0 frees 2, holder 1 frees 1: 3 within, 3 across.
        assert_eq!((e.freed_within, e.freed_across, e.freed_zero), (3, 3, 0));
        let freed: Vec<u64> = e.holders.iter().map(|h| h.freed).collect();
        assert_eq!(freed, [2, 2, 2]);
        let pages: Vec<u64> = e.holders.iter().map(|h| h.pages).collect();
        assert_eq!(pages, [4, 2, 2]);
    }

    proptest! {
        /// Whatever the holders, copies and frames mapped again, the
        /// counters are the kernel's rule per content over its mappings,
        /// the frames freed are the same rule over its frames, the
        /// breakdown adds up to the frames freed, and so do the holders'
        /// shares. With no frame mapped again, frames freed are
        /// `pages_sharing + ksm_zero_pages`.
        #[test]
        fn the_breakdown_adds_up(
            pages in proptest::collection::vec((0u32..4, 0u64..6, 1u64..40, 0u64..3), 0..60),
            m in 2u64..6,
            zero_pages in any::<bool>(),
            forked in any::<bool>(),
        ) {
            let zero = zero_page_hash();
            let mut c = Census::new();
            // Content -> (frames, mappings).
            let mut per: HashMap<u64, (u64, u64)> = HashMap::new();
            for &(h, content, n, again) in &pages {
                let hash = if content == 0 { zero } else { content };
                let again = if forked { again } else { 0 };
                c.add(h, hash, n);
                for _ in 0..again {
                    c.add_frame_mapped_again(h, hash);
                }
                let e = per.entry(hash).or_default();
                *e = (e.0 + n, e.1 + n + again);
            }
            let rule = SharingRule::new(m, zero_pages).unwrap();
            let e = c.estimate(rule);
            let (mut shared, mut sharing, mut unshared, mut volatile, mut zeros, mut freed) = (0, 0, 0, 0, 0, 0);
            for (&hash, &(f, k)) in &per {
                if hash == zero && zero_pages {
                    zeros += k;
                    freed += f;
                } else if f == 1 {
                    unshared += 1;
                    volatile += k - 1;
                } else {
                    let (a, b) = kernel(k, m);
                    shared += a;
                    sharing += b;
                    unshared += k - a - b;
                    freed += kernel(f, m).1;
                }
            }
            let frames: u64 = per.values().map(|&(f, _)| f).sum();
            let mappings: u64 = per.values().map(|&(_, k)| k).sum();
            prop_assert_eq!(e.counters.pages_shared, shared);
            prop_assert_eq!(e.counters.pages_sharing, sharing);
            prop_assert_eq!(e.counters.pages_unshared, unshared);
            prop_assert_eq!(e.counters.pages_volatile, volatile);
            prop_assert_eq!(e.counters.ksm_zero_pages, zeros);
            prop_assert_eq!(e.counters.rmap_items + zeros, mappings);
            prop_assert_eq!(e.pages_freed(), freed);
            if !forked {
                prop_assert_eq!(freed, sharing + zeros);
            }
            prop_assert_eq!(e.holders.iter().map(|h| h.freed).sum::<u64>(), freed);
            prop_assert_eq!(e.holders.iter().map(|h| h.pages).sum::<u64>(), frames);
            prop_assert_eq!(e.holders.iter().map(|h| h.pages + h.mapped_again).sum::<u64>(), mappings);
            prop_assert!(e.holders.iter().all(|h| h.freed_alone <= h.freed && h.freed <= h.pages));
        }
    }
}
