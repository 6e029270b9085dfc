//! Pruning and defragmentation of stable node chains, on their own clock
//! (`stable_node_chains_prune_millisecs`).
//!
//! Pruning collapses chains left with one dup into plain nodes (the kernel's
//! `stable_node_chains_prune_millisecs` pass) and tries again to free pool
//! slots that something else still mapped. Defragmentation
//! (`stable_node_defrag`) is the "proper defrag" Andrea Arcangeli names as
//! future work in the `max_page_sharing` thread on LKML (April 2016): in each
//! chain, keep the `ceil(mappings / max_page_sharing)` busiest dups and
//! refile the mappings of the others into their room. A refile is a merge
//! of a page into another copy of the same content, carried out like any
//! merge, so no write is lost; the emptied dups are freed.

use crate::batch::Decision;
use crate::page::{NodeId, PageRef};
use crate::pool::StablePool;
use crate::rmap::{Link, RmapItem};
use crate::scan::{BatchReport, Ksm};
use crate::space::{PageSpace, Target};
use crate::stable::{StableOp, StableReply, StableTree};
use crate::unstable::UnstableTree;
use std::collections::BTreeMap;

impl<S: StableTree, U: UnstableTree, P: StablePool> Ksm<S, U, P> {
    /// The pruning pass: defragmentation if enabled, chains left with one
    /// dup collapse, kept pool slots (and, with a shared tree, the slots of
    /// stable pages whose last mapper died) are tried again.
    pub fn prune(&mut self, space: &mut impl PageSpace, now_ms: u64) {
        self.last_prune_ms = now_ms;
        if self.tunables.stable_node_defrag {
            self.defrag(space);
        }
        self.stable.prune();
        self.dead.retry_kept();
        for slot in self.stable.take_orphans() {
            self.dead.push(slot);
        }
        self.reap(space);
    }

    fn defrag(&mut self, space: &mut impl PageSpace) {
        let max = self.stable.max_page_sharing();
        // Per chain, the dups that stay and their room; per source dup, its
        // chain and key.
        let mut rooms: Vec<Vec<(NodeId, u32)>> = Vec::new();
        let mut sources: BTreeMap<NodeId, (usize, u64)> = BTreeMap::new();
        for mut dups in self.stable.chains() {
            dups.sort_by_key(|d| (std::cmp::Reverse(d.mappings), d.id));
            let total: u64 = dups.iter().map(|d| u64::from(d.mappings)).sum();
            let keep = total.div_ceil(u64::from(max)).max(1) as usize;
            if dups.len() <= keep {
                continue;
            }
            for src in &dups[keep..] {
                sources.insert(src.id, (rooms.len(), src.key));
            }
            rooms.push(dups[..keep].iter().map(|d| (d.id, max.saturating_sub(d.mappings))).collect());
        }
        if sources.is_empty() {
            return;
        }
        // The pages of the source dups, from the rmap items, and where each goes.
        let mut moves: Vec<(PageRef, NodeId, NodeId, u64)> = Vec::new();
        for (page, it) in self.regions.all_linked() {
            let Link::Stable(src) = it.link() else { continue };
            let Some(&(chain, key)) = sources.get(&src) else { continue };
            let Some(t) = rooms[chain].iter_mut().find(|t| t.1 > 0) else { continue };
            t.1 -= 1;
            moves.push((page, src, t.0, key));
        }
        let ops: Vec<StableOp> = moves.iter().map(|&(_, _, node, _)| StableOp::AcquireNode { node }).collect();
        let mut replies = std::mem::take(&mut self.stable_replies);
        self.stable.apply(&ops, &mut replies);
        assert_eq!(replies.len(), ops.len(), "one stable-tree reply per op");
        for (&(page, src, _, key), r) in moves.iter().zip(replies.iter()) {
            let StableReply::Acquired { node, slot } = *r else { continue };
            let item = self.regions.item(page);
            self.regions.relink(page, RmapItem::new(item.oldchecksum, Link::Stable(node)));
            self.batch.push(page, Target::Slot(slot), Decision { node: Some(node), refile_from: Some(src), key });
        }
        self.stable_replies = replies;
        let mut report = BatchReport::default();
        self.flush(space, &mut report);
    }
}
