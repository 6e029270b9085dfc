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
//! [`Census`] takes the content hashes of pages held by one or more holders
//! (processes); [`Census::estimate`] yields the [`EstimateCounters`] by
//! kernel name, and a breakdown of the pages freed: zero pages, duplicates
//! inside one holder, duplicates across holders, and per holder.

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
    /// `ksm_zero_pages`: pages mapped to the zero page (with `use_zero_pages`).
    pub ksm_zero_pages: u64,
    /// The rmap items the kernel keeps: `pages_shared + pages_sharing +
    /// pages_unshared`.
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
    pub fn named(&self) -> [(&'static str, i64); 5] {
        [
            ("pages_shared", self.pages_shared as i64),
            ("pages_sharing", self.pages_sharing as i64),
            ("pages_unshared", self.pages_unshared as i64),
            ("ksm_zero_pages", self.ksm_zero_pages as i64),
            ("general_profit", self.general_profit),
        ]
    }
}

/// One holder's part of an [`Estimate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HolderEstimate {
    /// Pages of the holder counted (the kernel's pages scanned in one pass).
    pub pages: u64,
    /// Pages of the holder that merging frees: of each content, the copies
    /// beyond the ones kept, counted in holder order (the first holder of a
    /// content keeps its first copy); every zero page with `use_zero_pages`.
    pub freed: u64,
    /// Pages merging this holder alone would free (its own duplicates and,
    /// with `use_zero_pages`, its zero pages).
    pub freed_alone: u64,
}

/// What merging would reach: the counters, and where the freed pages come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The rule the estimate follows.
    pub rule: SharingRule,
    /// The counters by kernel name.
    pub counters: EstimateCounters,
    /// Pages freed that hold zeros (as `ksm_zero_pages` with
    /// `use_zero_pages`, else as copies of the zero content).
    pub freed_zero: u64,
    /// Non-zero pages freed by merging each holder's pages among themselves.
    pub freed_within: u64,
    /// Non-zero pages freed only by merging across holders (the rest).
    pub freed_across: u64,
    /// Distinct contents counted.
    pub contents: u64,
    /// Per holder, in holder order.
    pub holders: Vec<HolderEstimate>,
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
    contents: HashMap<u64, Holders, BuildHasherDefault<PassThrough>>,
    /// Pages per holder.
    pages: Vec<u64>,
}

impl Census {
    /// An empty census.
    pub fn new() -> Census {
        Census::default()
    }

    /// Counts `copies` pages of content `hash` held by `holder`.
    pub fn add(&mut self, holder: u32, hash: u64, copies: u64) {
        if copies == 0 {
            return;
        }
        let h = holder as usize;
        if self.pages.len() <= h {
            self.pages.resize(h + 1, 0);
        }
        self.pages[h] += copies;
        match self.contents.entry(hash) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(holder, copies),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Holders::One((holder, copies)));
            }
        }
    }

    /// Makes sure holder `holder` exists (with no pages, if none were added).
    pub fn add_holder(&mut self, holder: u32) {
        let h = holder as usize;
        if self.pages.len() <= h {
            self.pages.resize(h + 1, 0);
        }
    }

    /// Adds every page `other` counted (with its holder numbers).
    pub fn absorb(&mut self, other: &Census) {
        for (h, _) in other.pages.iter().enumerate() {
            self.add_holder(h as u32);
        }
        for (&hash, holders) in &other.contents {
            for &(h, n) in holders.as_slice() {
                self.add(h, hash, n);
            }
        }
    }

    /// Pages counted, over all holders.
    pub fn pages(&self) -> u64 {
        self.pages.iter().sum()
    }

    /// Distinct contents counted.
    pub fn contents(&self) -> usize {
        self.contents.len()
    }

    /// What merging every page counted would reach under `rule`.
    pub fn estimate(&self, rule: SharingRule) -> Estimate {
        let zero = zero_page_hash();
        let mut holders: Vec<HolderEstimate> =
            self.pages.iter().map(|&pages| HolderEstimate { pages, ..HolderEstimate::default() }).collect();
        let mut e = Estimate { rule, contents: self.contents.len() as u64, ..Estimate::default() };
        let c = &mut e.counters;
        for (&hash, copies) in &self.contents {
            let copies = copies.as_slice();
            let k: u64 = copies.iter().map(|&(_, n)| n).sum();
            if hash == zero && rule.use_zero_pages {
                c.ksm_zero_pages += k;
                e.freed_zero += k;
                for &(h, n) in copies {
                    holders[h as usize].freed += n;
                    holders[h as usize].freed_alone += n;
                }
                continue;
            }
            let (shared, sharing) = rule.stable(k);
            c.pages_shared += shared;
            c.pages_sharing += sharing;
            c.pages_unshared += k - shared - sharing;
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
        c.rmap_items = c.pages_shared + c.pages_sharing + c.pages_unshared;
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
    fn absorbing_censuses_is_counting_their_pages_in_one() {
        let (mut a, mut b, mut one) = (Census::new(), Census::new(), Census::new());
        for (holder, hash, copies) in [(0, 1, 3), (0, 2, 1), (2, 1, 4), (2, 3, 2)] {
            a.add(holder, hash, copies);
            one.add(holder, hash, copies);
        }
        for (holder, hash, copies) in [(1, 1, 2), (1, 3, 5), (3, 9, 1)] {
            b.add(holder, hash, copies);
            one.add(holder, hash, copies);
        }
        a.absorb(&b);
        let rule = SharingRule::new(3, false).unwrap();
        assert_eq!(a.estimate(rule), one.estimate(rule));
        assert_eq!((a.pages(), a.contents()), (one.pages(), one.contents()));
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
        /// Whatever the holders and copies, the totals are the kernel's
        /// rule per content, the breakdown adds up to the pages freed, and
        /// so do the holders' shares.
        #[test]
        fn the_breakdown_adds_up(
            pages in proptest::collection::vec((0u32..4, 0u64..6, 1u64..40), 0..60),
            m in 2u64..6,
            zero_pages in any::<bool>(),
        ) {
            let zero = zero_page_hash();
            let mut c = Census::new();
            let mut per: HashMap<u64, u64> = HashMap::new();
            for &(h, content, n) in &pages {
                let hash = if content == 0 { zero } else { content };
                c.add(h, hash, n);
                *per.entry(hash).or_default() += n;
            }
            let rule = SharingRule::new(m, zero_pages).unwrap();
            let e = c.estimate(rule);
            let (mut shared, mut sharing, mut zeros) = (0, 0, 0);
            for (&hash, &k) in &per {
                if hash == zero && zero_pages {
                    zeros += k;
                } else {
                    let (a, b) = kernel(k, m);
                    shared += a;
                    sharing += b;
                }
            }
            let total: u64 = per.values().sum();
            prop_assert_eq!(e.counters.pages_shared, shared);
            prop_assert_eq!(e.counters.pages_sharing, sharing);
            prop_assert_eq!(e.counters.ksm_zero_pages, zeros);
            prop_assert_eq!(e.counters.pages_unshared, total - shared - sharing - zeros);
            prop_assert_eq!(e.freed_zero + e.freed_within + e.freed_across, sharing + zeros);
            prop_assert_eq!(e.holders.iter().map(|h| h.freed).sum::<u64>(), sharing + zeros);
            prop_assert_eq!(e.holders.iter().map(|h| h.pages).sum::<u64>(), total);
            prop_assert!(e.holders.iter().all(|h| h.freed_alone <= h.freed && h.freed <= h.pages));
        }
    }
}
