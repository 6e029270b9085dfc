//! `cmp_and_merge_page`, for the candidates of one visit (a run of small
//! pages, or one huge page), in page order:
//!
//! 1. each page is hashed; its checksum against its rmap item's says whether
//!    it held still since the previous visit;
//! 2. with `use_zero_pages`, an empty page that held still merges with the
//!    kernel's zero page (no rmap item);
//! 3. the stable tree is asked, one [`StableOp::Acquire`] per page in one
//!    call: a match merges the page into the busiest stable page of its
//!    content that has fewer than `max_page_sharing` mappings;
//! 4. a page that changed since its previous visit is *volatile*: its new
//!    checksum is kept and it goes no further this scan;
//! 5. the unstable tree is asked, one op per content in one call: pages of
//!    one content pair with the page filed there, or among themselves (the
//!    kernel, page by page, pairs the first two and merges the next ones into
//!    the stable page they made), or the one page is filed;
//! 6. pairs become new stable pages ([`Ksm::new_stable_pages`]): pool slots
//!    in one call, each filled from one of the pages, then inserted in one
//!    call with all their mappings.
//!
//! Every merge is only decided here: it goes into the [`crate::batch::Batch`]
//! and the page space carries it out, comparing full contents while writers
//! wait, so a hash never merges alone.

use crate::batch::Decision;
use crate::page::{checksum_of, zero_page_hash, Domain, NodeId, PageRef, Slot};
use crate::pool::{SlotHint, StablePool};
use crate::rmap::{Link, RmapItem};
use crate::scan::Ksm;
use crate::space::{PageSpace, Target};
use crate::stable::{StableOp, StableReply, StableTree};
use crate::unstable::{UnstableOp, UnstableReply, UnstableTree};
use std::collections::{HashMap, HashSet};
use std::ops::Range;

/// A hashed page on its way through `cmp_and_merge_page`.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    page: PageRef,
    /// Its position among the visit's candidates (page order).
    pos: usize,
    hash: u64,
    /// The index key: the hash mixed with the domain's.
    key: u64,
    checksum: u32,
    domain: Domain,
    /// Whether the checksum held still since the previous visit.
    unchanged: bool,
}

/// A new stable page to make: pages of one content that paired.
#[derive(Clone, Debug)]
struct Birth {
    /// The pages that will map it: the unstable tree's page first if one
    /// paired, then candidates in page order.
    pages: Vec<PageRef>,
    /// The unstable tree's page among them, if any.
    tree_page: Option<PageRef>,
    /// The page its slot is filled from (a candidate).
    fill_from: PageRef,
    hash: u64,
    key: u64,
    checksum: u32,
    domain: Domain,
    /// Where, in page order, the kernel would have made it.
    pos: usize,
}

impl<S: StableTree, U: UnstableTree, P: StablePool> Ksm<S, U, P> {
    /// The kernel's `cmp_and_merge_page` for the candidates of one visit.
    pub(crate) fn cmp_and_merge_pages(&mut self, space: &mut impl PageSpace, pages: &[PageRef]) {
        if pages.is_empty() {
            return;
        }
        let candidates = self.hash_candidates(space, pages);
        let candidates = self.merge_zero_pages(candidates);
        let (unstable, volatile) = self.search_stable(candidates);
        let mut filed = HashSet::new();
        let births = self.search_unstable(unstable, &mut filed);
        let made = self.new_stable_pages(space, births, &mut filed);
        self.merge_volatile_into_new(volatile, &made);
    }

    /// Step 1: hashes. A page that cannot be read loses its rmap item.
    fn hash_candidates(&mut self, space: &mut impl PageSpace, pages: &[PageRef]) -> Vec<Candidate> {
        let mut out = Vec::with_capacity(pages.len());
        for (pos, &page) in pages.iter().enumerate() {
            let hash = match space.hash_page(page) {
                Ok(h) => h,
                Err(_) => {
                    self.c.merge_errors += 1;
                    self.regions.relink(page, RmapItem::default());
                    continue;
                }
            };
            let item = self.regions.item(page);
            let domain = self.regions.domain(page.region).unwrap_or_default();
            let checksum = checksum_of(hash);
            let unchanged = item.link() != Link::None && item.oldchecksum == checksum;
            out.push(Candidate { page, pos, hash, key: domain.key(hash), checksum, domain, unchanged });
        }
        out
    }

    /// Step 2: zero pages, and pages that cannot merge this scan because the
    /// VMA budget ran out. Returns the others.
    fn merge_zero_pages(&mut self, candidates: Vec<Candidate>) -> Vec<Candidate> {
        let over_budget = self.over_budget_scan == Some(self.c.full_scans);
        let mut rest = Vec::with_capacity(candidates.len());
        for c in candidates {
            if self.tunables.use_zero_pages && c.unchanged && c.hash == zero_page_hash() {
                self.regions.relink(c.page, RmapItem::new(c.checksum, Link::Zero));
                self.batch.push(c.page, Target::Zero, Decision { node: None, refile_from: None, key: c.key });
            } else if over_budget {
                // Out of mappings until the next scan: merging into a stable
                // page or making a new one would be refused again.
                self.regions.relink(c.page, RmapItem::new(c.checksum, Link::Seen));
            } else {
                rest.push(c);
            }
        }
        rest
    }

    /// Steps 3 and 4: one call to the stable tree for every candidate.
    /// Returns the candidates for the unstable tree and the volatile ones.
    fn search_stable(&mut self, candidates: Vec<Candidate>) -> (Vec<Candidate>, Vec<Candidate>) {
        let ops: Vec<StableOp> =
            candidates.iter().map(|c| StableOp::Acquire { key: c.key, domain: c.domain }).collect();
        let mut replies = std::mem::take(&mut self.stable_replies);
        self.stable.apply(&ops, &mut replies);
        assert_eq!(replies.len(), ops.len(), "one stable-tree reply per op");
        let (mut unstable, mut volatile) = (Vec::new(), Vec::new());
        for (c, r) in candidates.into_iter().zip(replies.iter()) {
            match *r {
                StableReply::Acquired { node, slot } => self.decide_stable(c.page, c.checksum, node, slot, c.key),
                _ if !c.unchanged => {
                    // Volatile: remember the checksum, go no further this scan.
                    self.regions.relink(c.page, RmapItem::new(c.checksum, Link::Seen));
                    volatile.push(c);
                }
                _ => unstable.push(c),
            }
        }
        self.stable_replies = replies;
        (unstable, volatile)
    }

    fn decide_stable(&mut self, page: PageRef, checksum: u32, node: NodeId, slot: Slot, key: u64) {
        self.regions.relink(page, RmapItem::new(checksum, Link::Stable(node)));
        self.batch.push_stable(page, slot, node, key);
    }

    /// Step 5: one call to the unstable tree, one op per content. Returns
    /// the new stable pages to make; `filed` gets the keys under which a
    /// page of this visit is filed.
    fn search_unstable(&mut self, mut candidates: Vec<Candidate>, filed: &mut HashSet<u64>) -> Vec<Birth> {
        // Candidates by content (sorted, so a content's pages are one
        // slice), the contents in order of first appearance (so new stable
        // pages of consecutive pages take consecutive slots).
        candidates.sort_unstable_by_key(|c| (c.key, c.pos));
        let mut groups: Vec<Range<usize>> = Vec::new();
        for (i, c) in candidates.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if candidates[g.start].key == c.key => g.end = i + 1,
                _ => groups.push(i..i + 1),
            }
        }
        groups.sort_unstable_by_key(|g| candidates[g.start].pos);
        let ops: Vec<UnstableOp> = groups
            .iter()
            .map(|g| match &candidates[g.clone()] {
                [one] => UnstableOp::SearchInsert { key: one.key, page: one.page },
                more => UnstableOp::Take { key: more[0].key },
            })
            .collect();
        let mut replies = Vec::with_capacity(ops.len());
        self.unstable.apply(&ops, &mut replies);
        assert_eq!(replies.len(), ops.len(), "one unstable-tree reply per op");
        let mut fixups = Vec::new();
        let mut births = Vec::new();
        for (g, reply) in groups.into_iter().zip(replies) {
            self.pair(&candidates[g], reply, &mut fixups, &mut births, filed);
        }
        let mut done = Vec::new();
        self.unstable.apply(&fixups, &mut done);
        births
    }

    /// Pairs the candidates of one content with what the unstable tree
    /// answered; pages to put back in the tree go to `fixups`.
    fn pair(
        &mut self,
        group: &[Candidate],
        reply: UnstableReply,
        fixups: &mut Vec<UnstableOp>,
        births: &mut Vec<Birth>,
        filed: &mut HashSet<u64>,
    ) {
        let first = group[0];
        let (mut tree_page, elsewhere) = match reply {
            UnstableReply::Filed => {
                // One page, filed: it waits for a partner.
                self.regions.relink(first.page, RmapItem::new(first.checksum, Link::Unstable));
                self.thp.filed(first.page);
                filed.insert(first.key);
                return;
            }
            UnstableReply::Match(p) => (Some(p), false),
            UnstableReply::Elsewhere(_) => (None, true),
            UnstableReply::Empty | UnstableReply::Inserted => (None, false),
        };
        // A stale entry: the page moved on, changed, or its region left.
        if let Some(p) = tree_page {
            if group.iter().any(|c| c.page == p) || !self.regions.is_filed(p, first.checksum, first.domain) {
                tree_page = None;
            }
        }
        // Filed from a huge page that is not split (yet)?
        if let Some(p) = tree_page {
            if let Some(frame) = self.thp.unsplit_frame_of(p) {
                let same_huge = self.thp.is_visiting(p.region, frame);
                if same_huge || self.tunables.thp_split_min_subpages == 1 {
                    // Pairing splits it (the kernel's behaviour at 1).
                    if !same_huge && self.thp.note_split(p.region, frame) {
                        self.c.thp_split += 1;
                    }
                } else if self.thp.visiting() {
                    // Subpages of another huge page: they would merge
                    // (counted), but pairing would split the other one. The
                    // entry stays.
                    for c in group {
                        self.thp.block();
                        self.regions.relink(c.page, RmapItem::new(c.checksum, Link::Seen));
                    }
                    fixups.push(UnstableOp::Insert { key: first.key, page: p });
                    filed.insert(first.key);
                    return;
                } else {
                    // Small pages take the entry's place, so small pages with
                    // this content still pair with each other.
                    self.thp.forget_filed(p);
                    tree_page = None;
                }
            }
        }
        let pages: Vec<PageRef> = tree_page.into_iter().chain(group.iter().map(|c| c.page)).collect();
        // Up to max_page_sharing pages per stable page; a last page alone is
        // filed (a shared tree's "held elsewhere" makes even one page a
        // stable page the other process can map).
        let max = self.stable.max_page_sharing() as usize;
        let mut taken = 0;
        for chunk in pages.chunks(max) {
            let with_tree = taken == 0 && tree_page.is_some();
            let members = chunk.len() - usize::from(with_tree);
            let first_member = &group[taken];
            if chunk.len() == 1 && !elsewhere {
                self.regions.relink(chunk[0], RmapItem::new(first.checksum, Link::Unstable));
                self.thp.filed(chunk[0]);
                fixups.push(UnstableOp::Insert { key: first.key, page: chunk[0] });
                filed.insert(first.key);
            } else {
                // The kernel makes it when the second page of the pair comes.
                let completes = if with_tree || elsewhere { first_member } else { &group[taken + 1] };
                births.push(Birth {
                    pages: chunk.to_vec(),
                    tree_page: tree_page.filter(|_| with_tree),
                    fill_from: first_member.page,
                    hash: first.hash,
                    key: first.key,
                    checksum: first.checksum,
                    domain: first.domain,
                    pos: completes.pos,
                });
            }
            taken += members;
        }
    }

    /// Step 6: new stable pages, each filled from one of its pages. Returns
    /// the made ones by content key: their nodes and positions.
    fn new_stable_pages(
        &mut self,
        space: &mut impl PageSpace,
        births: Vec<Birth>,
        filed: &mut HashSet<u64>,
    ) -> HashMap<u64, Vec<(usize, NodeId)>> {
        if births.is_empty() {
            return HashMap::new();
        }
        // Slots: one call; a page right after the previous new stable page's
        // takes the next slot, so runs of pages map runs of slots.
        let mut prev = self.last_new_slot.map(|(p, _)| p);
        let hints: Vec<SlotHint> = births
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let follows = prev.is_some_and(|p| p.region == b.fill_from.region && p.index + 1 == b.fill_from.index);
                prev = Some(b.fill_from);
                match (follows, i, self.last_new_slot) {
                    (false, _, _) => SlotHint::Any,
                    (true, 0, Some((_, s))) => SlotHint::Exactly(Slot(s.0 + 1)),
                    (true, 0, None) => SlotHint::Any,
                    (true, _, _) => SlotHint::FollowPrevious,
                }
            })
            .collect();
        let mut slots = Vec::with_capacity(births.len());
        self.pool.alloc(&hints, &mut slots);
        slots.resize(births.len(), None);
        // Fill each slot; a page that changed under the copy gives it back.
        let mut filled: Vec<(Birth, Slot)> = Vec::with_capacity(births.len());
        let mut fixups = Vec::new();
        for (b, slot) in births.into_iter().zip(slots) {
            let Some(slot) = slot else {
                self.unborn(&b, &mut fixups, filed);
                continue;
            };
            match space.fill_slot(b.fill_from, slot) {
                Ok(h) if h == b.hash => filled.push((b, slot)),
                other => {
                    if other.is_err() {
                        self.c.merge_errors += 1;
                    } else {
                        self.c.merge_races += 1;
                    }
                    self.dead.push(slot);
                    self.unborn(&b, &mut fixups, filed);
                }
            }
        }
        // Dups of a chain must hold the same bytes, in the same domain: a
        // different content (or domain) with the same 64-bit key stays out
        // of the index.
        let finds: Vec<StableOp> = filled.iter().map(|(b, _)| StableOp::Find { key: b.key }).collect();
        let mut found = std::mem::take(&mut self.stable_replies);
        self.stable.apply(&finds, &mut found);
        assert_eq!(found.len(), finds.len(), "one stable-tree reply per op");
        let mut first_of_key: HashMap<u64, usize> = HashMap::new();
        let mut inserts = Vec::with_capacity(filled.len());
        for (i, (b, slot)) in filled.iter().enumerate() {
            let earlier = *first_of_key.entry(b.key).or_insert(i);
            let other = match found[i] {
                StableReply::Found(Some(n)) => Some((n.slot, n.domain)),
                _ if earlier < i => Some((filled[earlier].1, filled[earlier].0.domain)),
                _ => None,
            };
            let indexed = match other {
                Some((o_slot, o_domain)) => o_domain == b.domain && space.slots_equal(*slot, o_slot).unwrap_or(false),
                None => true,
            };
            inserts.push(StableOp::Insert {
                slot: *slot,
                key: b.key,
                domain: b.domain,
                mappings: b.pages.len() as u32,
                indexed,
            });
        }
        self.stable.apply(&inserts, &mut found);
        assert_eq!(found.len(), inserts.len(), "one stable-tree reply per op");
        let mut made: HashMap<u64, Vec<(usize, NodeId)>> = HashMap::new();
        for ((b, slot), reply) in filled.into_iter().zip(found.iter()) {
            let StableReply::Inserted(node) = *reply else {
                // Refused: the slot goes back, the pages wait.
                self.dead.push(slot);
                self.unborn(&b, &mut fixups, filed);
                continue;
            };
            for &p in &b.pages {
                self.decide_stable(p, b.checksum, node, slot, b.key);
            }
            self.last_new_slot = Some((b.fill_from, slot));
            made.entry(b.key).or_default().push((b.pos, node));
        }
        self.stable_replies = found;
        let mut done = Vec::new();
        self.unstable.apply(&fixups, &mut done);
        made
    }

    /// A new stable page could not be made (no slot, or its page changed
    /// under the copy): the unstable tree's page goes back there (or the
    /// first page is filed), the others wait for the next scan, as the
    /// kernel's page-by-page walk leaves them. At most one page of a content
    /// is filed per visit (`filed`): a second would replace the first in the
    /// tree while both counted as unshared.
    fn unborn(&mut self, b: &Birth, fixups: &mut Vec<UnstableOp>, filed: &mut HashSet<u64>) {
        let back = if filed.insert(b.key) { Some(b.tree_page.unwrap_or(b.pages[0])) } else { None };
        if let Some(page) = back {
            fixups.push(UnstableOp::Insert { key: b.key, page });
            self.thp.filed(page);
        }
        for &p in &b.pages {
            let link = if Some(p) == back { Link::Unstable } else { Link::Seen };
            self.regions.relink(p, RmapItem::new(b.checksum, link));
        }
    }

    /// A volatile page visited after a stable page of its content was made
    /// in this visit merges into it, as the kernel's page-by-page walk
    /// would have found it in the stable tree (only stable pages made before
    /// it in page order; the latest such with room).
    fn merge_volatile_into_new(&mut self, volatile: Vec<Candidate>, made: &HashMap<u64, Vec<(usize, NodeId)>>) {
        if made.is_empty() {
            return;
        }
        let late: Vec<(Candidate, NodeId)> = volatile
            .into_iter()
            .filter_map(|v| {
                let node = made.get(&v.key)?.iter().filter(|(pos, _)| *pos < v.pos).max_by_key(|(pos, _)| *pos)?.1;
                Some((v, node))
            })
            .collect();
        if late.is_empty() {
            return;
        }
        let ops: Vec<StableOp> = late.iter().map(|&(_, node)| StableOp::AcquireNode { node }).collect();
        let mut replies = std::mem::take(&mut self.stable_replies);
        self.stable.apply(&ops, &mut replies);
        assert_eq!(replies.len(), ops.len(), "one stable-tree reply per op");
        for ((c, _), r) in late.iter().zip(replies.iter()) {
            if let StableReply::Acquired { node, slot } = *r {
                self.decide_stable(c.page, c.checksum, node, slot, c.key);
            }
        }
        self.stable_replies = replies;
    }
}
