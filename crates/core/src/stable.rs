//! The stable tree: pool pages that never change, and never discarded.
//!
//! Keyed by content hash instead of the kernel's memcmp-ordered rbtree: a
//! lookup is O(1) plus the dups of a chain. A hash match is only a candidate:
//! the page space compares full contents before any merge.
//!
//! Chains and dups (`Documentation/admin-guide/mm/ksm.rst`,
//! `max_page_sharing`): once a stable node has `max_page_sharing`
//! mappings, the next pages with its content form a new copy, a *dup*, and
//! the entry becomes a *chain*. Lookups pick the busiest dup that still has
//! room (the heuristic of the commit "ksm: introduce ksm_max_page_sharing
//! per page deduplication limit"), so dups fill before new ones appear. A chain
//! left with one dup collapses back into a plain node at the next prune,
//! as the kernel's `stable_node_chains_prune_millisecs` pass does.
//!
//! [`StableIndex`] is the interface a pool shared by several processes will
//! implement; [`LocalStableIndex`] is the in-process one.

use crate::page::Slot;
use crate::rmap::MAX_NODE_ID;
use std::collections::HashMap;

/// A stable node's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// One stable page (a dup, when it hangs off a chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StableNode {
    /// Its pool slot.
    pub slot: Slot,
    /// Its index key: the content hash, mixed with its domain's ([`crate::Domain::key`]).
    pub hash: u64,
    /// The trust domain of the pages that map it.
    pub domain: crate::Domain,
    /// Mappings of the page (the kernel's `rmap_hlist_len`), never above `max_page_sharing`.
    pub rmap_hlist_len: u32,
    /// Whether the node is findable by hash (false for an orphan whose hash
    /// collided with a different content: it keeps its mappings, takes no more).
    pub indexed: bool,
}

/// The stable tree's interface.
pub trait StableIndex {
    /// The node `id`.
    fn node(&self, id: NodeId) -> &StableNode;
    /// The node `id`, mutable.
    fn node_mut(&mut self, id: NodeId) -> &mut StableNode;
    /// The busiest node with `hash` that has fewer than `max_page_sharing`
    /// mappings; `Err(true)` when nodes with `hash` exist but are all full,
    /// `Err(false)` when there are none.
    fn lookup(&mut self, hash: u64, max_page_sharing: u32) -> Result<NodeId, bool>;
    /// Any indexed node with `hash` (to check a new dup's content against).
    fn any_with_hash(&self, hash: u64) -> Option<NodeId>;
    /// Adds a node; indexed nodes with an existing hash become dups of its chain.
    fn insert(&mut self, node: StableNode) -> NodeId;
    /// Removes a node (its mappings must be gone) and returns it.
    fn remove(&mut self, id: NodeId) -> StableNode;
    /// Collapses chains left with a single dup; returns how many collapsed.
    fn prune(&mut self) -> u64;
    /// `(stable_node_chains, stable_node_dups)`.
    fn chain_counts(&self) -> (u64, u64);
    /// The dups of every chain.
    fn chains(&self) -> Vec<Vec<NodeId>>;
    /// Ids of every node.
    fn ids(&self) -> Vec<NodeId>;
    /// Bytes of memory the index uses.
    fn metadata_bytes(&self) -> u64;
    /// Gives memory back after many nodes went (all of it when none is left).
    fn shrink(&mut self);
}

/// An index entry: a node id, or (top bit set) an index into `chains`.
const CHAIN: u32 = 1 << 31;

/// The in-process stable tree.
#[derive(Debug, Default)]
pub struct LocalStableIndex {
    nodes: Vec<Option<StableNode>>,
    free_ids: Vec<u32>,
    by_hash: HashMap<u64, u32>,
    chain_dups: Vec<Vec<NodeId>>,
    free_chains: Vec<u32>,
    chains: u64,
    dups: u64,
}

impl LocalStableIndex {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    fn new_chain(&mut self, dups: Vec<NodeId>) -> u32 {
        self.chains += 1;
        self.dups += dups.len() as u64;
        match self.free_chains.pop() {
            Some(c) => {
                self.chain_dups[c as usize] = dups;
                c | CHAIN
            }
            None => {
                self.chain_dups.push(dups);
                (self.chain_dups.len() as u32 - 1) | CHAIN
            }
        }
    }

    fn drop_chain(&mut self, c: u32) {
        let dups = std::mem::take(&mut self.chain_dups[c as usize]);
        self.chains -= 1;
        self.dups -= dups.len() as u64;
        self.free_chains.push(c);
    }
}

impl StableIndex for LocalStableIndex {
    fn node(&self, id: NodeId) -> &StableNode {
        self.nodes[id.0 as usize].as_ref().expect("live stable node")
    }

    fn node_mut(&mut self, id: NodeId) -> &mut StableNode {
        self.nodes[id.0 as usize].as_mut().expect("live stable node")
    }

    fn lookup(&mut self, hash: u64, max_page_sharing: u32) -> Result<NodeId, bool> {
        let nodes = &self.nodes;
        let len = |id: &NodeId| nodes[id.0 as usize].as_ref().map_or(u32::MAX, |n| n.rmap_hlist_len);
        match self.by_hash.get(&hash) {
            None => Err(false),
            Some(&e) if e & CHAIN == 0 => {
                if len(&NodeId(e)) < max_page_sharing {
                    Ok(NodeId(e))
                } else {
                    Err(true)
                }
            }
            Some(&e) => {
                // The dup at the head took the last mapping; while it has
                // room it takes the next one (O(1)). When it fills up, the
                // busiest dup with room moves to the head (as `stable_node_dup` does).
                let c = (e & !CHAIN) as usize;
                let dups = &self.chain_dups[c];
                if let Some(head) = dups.first().filter(|d| len(d) < max_page_sharing) {
                    return Ok(*head);
                }
                let best = dups
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| len(d) < max_page_sharing)
                    .max_by_key(|(_, d)| (len(d), std::cmp::Reverse(**d)))
                    .map(|(i, _)| i)
                    .ok_or(true)?;
                self.chain_dups[c].swap(0, best);
                Ok(self.chain_dups[c][0])
            }
        }
    }

    fn any_with_hash(&self, hash: u64) -> Option<NodeId> {
        let e = *self.by_hash.get(&hash)?;
        if e & CHAIN == 0 {
            Some(NodeId(e))
        } else {
            self.chain_dups[(e & !CHAIN) as usize].first().copied()
        }
    }

    fn insert(&mut self, node: StableNode) -> NodeId {
        let id = match self.free_ids.pop() {
            Some(i) => {
                self.nodes[i as usize] = Some(node);
                NodeId(i)
            }
            None => {
                let i = self.nodes.len() as u32;
                assert!(i <= MAX_NODE_ID, "stable node ids exhausted (the pool runs out of slots first)");
                self.nodes.push(Some(node));
                NodeId(i)
            }
        };
        if node.indexed {
            match self.by_hash.get(&node.hash).copied() {
                None => {
                    self.by_hash.insert(node.hash, id.0);
                }
                Some(first) if first & CHAIN == 0 => {
                    let c = self.new_chain(vec![NodeId(first), id]);
                    self.by_hash.insert(node.hash, c);
                }
                Some(c) => {
                    self.dups += 1;
                    self.chain_dups[(c & !CHAIN) as usize].push(id);
                }
            }
        }
        id
    }

    fn remove(&mut self, id: NodeId) -> StableNode {
        let node = self.nodes[id.0 as usize].take().expect("live stable node");
        self.free_ids.push(id.0);
        if node.indexed {
            match self.by_hash.get(&node.hash).copied() {
                Some(e) if e == id.0 => {
                    self.by_hash.remove(&node.hash);
                }
                Some(e) if e & CHAIN != 0 => {
                    let c = e & !CHAIN;
                    let dups = &mut self.chain_dups[c as usize];
                    if let Some(p) = dups.iter().position(|d| *d == id) {
                        dups.swap_remove(p);
                        self.dups -= 1;
                        if dups.is_empty() {
                            self.drop_chain(c);
                            self.by_hash.remove(&node.hash);
                        }
                    }
                }
                _ => {}
            }
        }
        node
    }

    fn prune(&mut self) -> u64 {
        let mut collapsed = 0;
        let single: Vec<(u64, u32)> = self
            .by_hash
            .iter()
            .filter(|(_, &e)| e & CHAIN != 0 && self.chain_dups[(e & !CHAIN) as usize].len() == 1)
            .map(|(&h, &e)| (h, e & !CHAIN))
            .collect();
        for (h, c) in single {
            let only = self.chain_dups[c as usize][0];
            self.drop_chain(c);
            self.by_hash.insert(h, only.0);
            collapsed += 1;
        }
        collapsed
    }

    fn chain_counts(&self) -> (u64, u64) {
        (self.chains, self.dups)
    }

    fn chains(&self) -> Vec<Vec<NodeId>> {
        self.by_hash
            .values()
            .filter(|&&e| e & CHAIN != 0)
            .map(|&e| self.chain_dups[(e & !CHAIN) as usize].clone())
            .collect()
    }

    fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.is_some()).map(|(i, _)| NodeId(i as u32)).collect()
    }

    fn shrink(&mut self) {
        if self.nodes.iter().all(Option::is_none) {
            *self = Self::default();
            return;
        }
        while self.nodes.last().is_some_and(Option::is_none) {
            let last = self.nodes.len() as u32 - 1;
            self.nodes.pop();
            self.free_ids.retain(|&i| i != last);
        }
        self.nodes.shrink_to_fit();
        self.free_ids.shrink_to_fit();
        self.by_hash.shrink_to_fit();
        self.chain_dups.shrink_to_fit();
    }

    fn metadata_bytes(&self) -> u64 {
        let nodes = self.nodes.capacity() * std::mem::size_of::<Option<StableNode>>();
        let map = self.by_hash.capacity() * (8 + 4 + 1);
        // Chains' dup lists, estimated from the counts (walking them per call would cost O(n)).
        let chains = self.chain_dups.capacity() * 24 + self.dups as usize * 4;
        (nodes + map + chains + self.free_ids.capacity() * 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(slot: u64, hash: u64, len: u32) -> StableNode {
        StableNode { slot: Slot(slot), hash, domain: crate::Domain(0), rmap_hlist_len: len, indexed: true }
    }

    #[test]
    fn chains_form_prune_and_pick_the_busiest_dup() {
        let mut t = LocalStableIndex::new();
        let a = t.insert(node(0, 7, 4));
        assert_eq!(t.lookup(7, 4), Err(true));
        assert_eq!(t.lookup(8, 4), Err(false));
        let b = t.insert(node(1, 7, 2));
        let c = t.insert(node(2, 7, 3));
        assert_eq!(t.chain_counts(), (1, 3));
        // The head (a) is full: the busiest dup with room moves there.
        assert_eq!(t.lookup(7, 4), Ok(c), "busiest dup with room first");
        t.node_mut(b).rmap_hlist_len = 3;
        assert_eq!(t.lookup(7, 4), Ok(c), "the head keeps taking mappings while it has room");
        t.node_mut(c).rmap_hlist_len = 4;
        assert_eq!(t.lookup(7, 4), Ok(b));
        t.remove(b);
        t.remove(c);
        assert_eq!(t.chain_counts(), (1, 1), "a chain keeps its last dup until pruned");
        assert_eq!(t.prune(), 1);
        assert_eq!(t.chain_counts(), (0, 0));
        assert_eq!(t.any_with_hash(7), Some(a));
        t.remove(a);
        assert_eq!(t.lookup(7, 4), Err(false));
    }
}
