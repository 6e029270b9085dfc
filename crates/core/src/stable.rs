//! The stable tree: pool pages that never change and are never discarded,
//! and how many pages map each (the kernel's `root_stable_tree`).
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
//! The tree owns the mapping counts (the kernel's `rmap_hlist_len`): the
//! scanner takes and gives back mappings with [`StableOp`]s, one call per
//! batch, and learns which pool slot died when a node's last mapping went.
//! Nothing hands out references into the tree, so a tree shared by several
//! processes (served by a daemon) can implement [`StableTree`] as well as
//! the in-process [`LocalStableTree`].

use crate::page::{Domain, NodeId, Slot};
use crate::rmap::MAX_NODE_ID;
use crate::tunables::TunableError;
use std::collections::HashMap;

/// A stable node as the tree reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NodeInfo {
    /// Its id.
    pub id: NodeId,
    /// Its pool slot.
    pub slot: Slot,
    /// Its index key: the content hash, mixed with its domain's ([`Domain::key`]).
    pub key: u64,
    /// The trust domain of the pages that map it.
    pub domain: Domain,
    /// Mappings of the page (the kernel's `rmap_hlist_len`), never above
    /// `max_page_sharing`.
    pub mappings: u32,
    /// Whether the node is findable by key (false for an orphan whose key
    /// collided with a different content: it keeps its mappings, takes no more).
    pub indexed: bool,
}

/// One request to the stable tree. A batch is carried out in order: a
/// mapping taken by one request counts for the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum StableOp {
    /// Take a mapping of the busiest node with `key` in `domain` that has
    /// fewer than `max_page_sharing` (the kernel's `stable_tree_search`
    /// followed by the merge it finds).
    Acquire {
        /// The content's key.
        key: u64,
        /// The page's trust domain.
        domain: Domain,
    },
    /// Take a mapping of `node` itself (a refile into a dup with room).
    AcquireNode {
        /// The node.
        node: NodeId,
    },
    /// Give back a mapping of `node` (the page was unmerged, written,
    /// discarded, or its merge failed); the last one removes the node.
    Release {
        /// The node.
        node: NodeId,
    },
    /// Any indexed node with `key` (to compare a new dup's content with).
    Find {
        /// The content's key.
        key: u64,
    },
    /// A new stable page (the kernel's `stable_tree_insert`) already
    /// holding `mappings` mappings; indexed nodes with an existing key
    /// become dups of its chain.
    Insert {
        /// Its pool slot, filled.
        slot: Slot,
        /// The content's key.
        key: u64,
        /// The domain of the pages that map it.
        domain: Domain,
        /// Mappings it starts with (at least 1, at most `max_page_sharing`).
        mappings: u32,
        /// Whether lookups may find it (see [`NodeInfo::indexed`]).
        indexed: bool,
    },
}

/// The answer to one [`StableOp`], in the same position of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum StableReply {
    /// A mapping of `node` was taken: map `slot`.
    Acquired {
        /// The node.
        node: NodeId,
        /// Its pool slot.
        slot: Slot,
    },
    /// Nodes with the key exist in the domain, all at `max_page_sharing`
    /// mappings (or the node asked for is full or gone).
    Full,
    /// No node with the key in the domain.
    Absent,
    /// The mapping was given back; `freed` is the node's slot if that was
    /// its last mapping (the node is gone; the slot's page can be freed).
    Released {
        /// The dead node's slot.
        freed: Option<Slot>,
    },
    /// What [`StableOp::Find`] found.
    Found(Option<NodeInfo>),
    /// The new node's id.
    Inserted(NodeId),
}

/// Totals the counters need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StableStats {
    /// Nodes with at least one mapping (`pages_shared`).
    pub nodes: u64,
    /// Mappings of all nodes: `pages_shared + pages_sharing`.
    pub mappings: u64,
    /// `stable_node_chains`.
    pub chains: u64,
    /// `stable_node_dups`.
    pub dups: u64,
}

/// The stable tree's interface: command-shaped and batched, so a daemon
/// can serve it to several processes.
pub trait StableTree {
    /// Carries out `ops` in order, writing one reply per op into `out`.
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>);
    /// Sets `max_page_sharing`: refused with [`TunableError::Busy`] (the
    /// kernel's EBUSY) while any node has mappings.
    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError>;
    /// The `max_page_sharing` the tree enforces (the authority for every
    /// engine using it).
    fn max_page_sharing(&self) -> u32;
    /// Totals for the counters.
    fn stats(&self) -> StableStats;
    /// The totals of what this tree's user holds: the nodes it maps and its
    /// mappings (all of them for a tree used by one engine; a client's own
    /// for a shared tree, whose [`StableTree::stats`] are system-wide).
    fn held_stats(&self) -> StableStats {
        self.stats()
    }
    /// Every node, appended to `out`.
    fn nodes(&self, out: &mut Vec<NodeInfo>);
    /// The dups of every chain.
    fn chains(&self) -> Vec<Vec<NodeInfo>>;
    /// Collapses chains left with a single dup; returns how many collapsed.
    fn prune(&mut self) -> u64;
    /// Bytes of memory the tree uses.
    fn metadata_bytes(&self) -> u64;
    /// Gives memory back after many nodes went (all of it when none is left).
    fn shrink(&mut self);
    /// Slots of stable pages whose last mappings died with another engine
    /// (a tree shared between processes): this engine frees their pages if
    /// nothing maps them. None for a tree used by one engine.
    fn take_orphans(&mut self) -> Vec<Slot> {
        Vec::new()
    }
    /// Whether slots whose pages could not be freed yet go back to the tree
    /// ([`StableTree::return_orphans`]) for any engine to retry, rather than
    /// staying with this one (which may die first).
    fn keeps_orphans(&self) -> bool {
        false
    }
    /// Slots whose pages could not be freed yet (something still maps them).
    fn return_orphans(&mut self, slots: &[Slot]) {
        debug_assert!(slots.is_empty(), "a tree used by one engine keeps no orphans");
    }
}

/// An index entry: a node id, or (top bit set) an index into `chains`.
const CHAIN: u32 = 1 << 31;

/// The in-process stable tree.
#[derive(Debug)]
pub struct LocalStableTree {
    max_page_sharing: u32,
    nodes: Vec<Option<NodeInfo>>,
    free_ids: Vec<u32>,
    by_key: HashMap<u64, u32>,
    chain_dups: Vec<Vec<NodeId>>,
    free_chains: Vec<u32>,
    stats: StableStats,
}

impl Default for LocalStableTree {
    fn default() -> Self {
        Self::new(crate::Tunables::default().max_page_sharing)
    }
}

impl LocalStableTree {
    /// An empty tree.
    pub fn new(max_page_sharing: u32) -> Self {
        LocalStableTree {
            max_page_sharing,
            nodes: Vec::new(),
            free_ids: Vec::new(),
            by_key: HashMap::new(),
            chain_dups: Vec::new(),
            free_chains: Vec::new(),
            stats: StableStats::default(),
        }
    }

    fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn new_chain(&mut self, dups: Vec<NodeId>) -> u32 {
        self.stats.chains += 1;
        self.stats.dups += dups.len() as u64;
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
        self.stats.chains -= 1;
        self.stats.dups -= dups.len() as u64;
        self.free_chains.push(c);
    }

    /// The busiest node with `key` that has room: `Err(Full)` when nodes
    /// with `key` exist but are all full, `Err(Absent)` when there are none.
    fn lookup(&mut self, key: u64) -> Result<NodeId, StableReply> {
        let (nodes, max) = (&self.nodes, self.max_page_sharing);
        let len = |id: &NodeId| nodes[id.0 as usize].as_ref().map_or(u32::MAX, |n| n.mappings);
        match self.by_key.get(&key) {
            None => Err(StableReply::Absent),
            Some(&e) if e & CHAIN == 0 => {
                if len(&NodeId(e)) < max {
                    Ok(NodeId(e))
                } else {
                    Err(StableReply::Full)
                }
            }
            Some(&e) => {
                // The dup at the head took the last mapping; while it has
                // room it takes the next one (O(1)). When it fills up, the
                // busiest dup with room moves to the head (as `stable_node_dup` does).
                let c = (e & !CHAIN) as usize;
                let dups = &self.chain_dups[c];
                if let Some(head) = dups.first().filter(|d| len(d) < max) {
                    return Ok(*head);
                }
                let best = dups
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| len(d) < max)
                    .max_by_key(|(_, d)| (len(d), std::cmp::Reverse(**d)))
                    .map(|(i, _)| i)
                    .ok_or(StableReply::Full)?;
                self.chain_dups[c].swap(0, best);
                Ok(self.chain_dups[c][0])
            }
        }
    }

    fn take(&mut self, id: NodeId) -> StableReply {
        let max = self.max_page_sharing;
        match self.nodes.get_mut(id.0 as usize).and_then(Option::as_mut) {
            Some(n) if n.mappings < max => {
                n.mappings += 1;
                self.stats.mappings += 1;
                StableReply::Acquired { node: id, slot: n.slot }
            }
            Some(_) => StableReply::Full,
            None => {
                debug_assert!(false, "a mapping of dead node {id:?} asked for");
                StableReply::Full
            }
        }
    }

    fn release(&mut self, id: NodeId) -> StableReply {
        let Some(n) = self.nodes.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            debug_assert!(false, "a mapping of dead node {id:?} given back");
            return StableReply::Released { freed: None };
        };
        n.mappings -= 1;
        self.stats.mappings -= 1;
        if n.mappings > 0 {
            return StableReply::Released { freed: None };
        }
        let node = self.remove(id);
        StableReply::Released { freed: Some(node.slot) }
    }

    fn insert(&mut self, node: NodeInfo) -> NodeId {
        debug_assert!(node.mappings >= 1 && node.mappings <= self.max_page_sharing, "{node:?}");
        let id = match self.free_ids.pop() {
            Some(i) => NodeId(i),
            None => {
                let i = self.nodes.len() as u32;
                assert!(i <= MAX_NODE_ID, "stable node ids exhausted (the pool runs out of slots first)");
                self.nodes.push(None);
                NodeId(i)
            }
        };
        self.nodes[id.0 as usize] = Some(NodeInfo { id, ..node });
        self.stats.nodes += 1;
        self.stats.mappings += node.mappings as u64;
        if node.indexed {
            match self.by_key.get(&node.key).copied() {
                None => {
                    self.by_key.insert(node.key, id.0);
                }
                Some(first) if first & CHAIN == 0 => {
                    let c = self.new_chain(vec![NodeId(first), id]);
                    self.by_key.insert(node.key, c);
                }
                Some(c) => {
                    self.stats.dups += 1;
                    self.chain_dups[(c & !CHAIN) as usize].push(id);
                }
            }
        }
        id
    }

    fn remove(&mut self, id: NodeId) -> NodeInfo {
        let node = self.nodes[id.0 as usize].take().expect("live stable node");
        self.free_ids.push(id.0);
        self.stats.nodes -= 1;
        if node.indexed {
            match self.by_key.get(&node.key).copied() {
                Some(e) if e == id.0 => {
                    self.by_key.remove(&node.key);
                }
                Some(e) if e & CHAIN != 0 => {
                    let c = e & !CHAIN;
                    let dups = &mut self.chain_dups[c as usize];
                    if let Some(p) = dups.iter().position(|d| *d == id) {
                        dups.swap_remove(p);
                        self.stats.dups -= 1;
                        if dups.is_empty() {
                            self.drop_chain(c);
                            self.by_key.remove(&node.key);
                        }
                    }
                }
                _ => {}
            }
        }
        node
    }

    fn find(&self, key: u64) -> Option<NodeInfo> {
        let e = *self.by_key.get(&key)?;
        let id = if e & CHAIN == 0 { NodeId(e) } else { *self.chain_dups[(e & !CHAIN) as usize].first()? };
        self.node(id).copied()
    }
}

impl StableTree for LocalStableTree {
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>) {
        out.clear();
        for op in ops {
            let reply = match *op {
                StableOp::Acquire { key, domain } => match self.lookup(key) {
                    Ok(id) if self.node(id).is_some_and(|n| n.domain == domain) => self.take(id),
                    // The same key in another domain (a hash collision across
                    // domains): no match here.
                    Ok(_) => StableReply::Absent,
                    Err(miss) => miss,
                },
                StableOp::AcquireNode { node } => self.take(node),
                StableOp::Release { node } => self.release(node),
                StableOp::Find { key } => StableReply::Found(self.find(key)),
                StableOp::Insert { slot, key, domain, mappings, indexed } => {
                    StableReply::Inserted(self.insert(NodeInfo { id: NodeId(0), slot, key, domain, mappings, indexed }))
                }
            };
            out.push(reply);
        }
    }

    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        if max != self.max_page_sharing && self.stats.nodes > 0 {
            return Err(TunableError::Busy { pages_shared: self.stats.nodes });
        }
        self.max_page_sharing = max;
        Ok(())
    }

    fn max_page_sharing(&self) -> u32 {
        self.max_page_sharing
    }

    fn stats(&self) -> StableStats {
        self.stats
    }

    fn nodes(&self, out: &mut Vec<NodeInfo>) {
        out.extend(self.nodes.iter().flatten().copied());
    }

    fn chains(&self) -> Vec<Vec<NodeInfo>> {
        self.by_key
            .values()
            .filter(|&&e| e & CHAIN != 0)
            .map(|&e| self.chain_dups[(e & !CHAIN) as usize].iter().filter_map(|d| self.node(*d).copied()).collect())
            .collect()
    }

    fn prune(&mut self) -> u64 {
        let mut collapsed = 0;
        let single: Vec<(u64, u32)> = self
            .by_key
            .iter()
            .filter(|(_, &e)| e & CHAIN != 0 && self.chain_dups[(e & !CHAIN) as usize].len() == 1)
            .map(|(&h, &e)| (h, e & !CHAIN))
            .collect();
        for (h, c) in single {
            let only = self.chain_dups[c as usize][0];
            self.drop_chain(c);
            self.by_key.insert(h, only.0);
            collapsed += 1;
        }
        collapsed
    }

    fn shrink(&mut self) {
        if self.nodes.iter().all(Option::is_none) {
            *self = Self::new(self.max_page_sharing);
            return;
        }
        while self.nodes.last().is_some_and(Option::is_none) {
            let last = self.nodes.len() as u32 - 1;
            self.nodes.pop();
            self.free_ids.retain(|&i| i != last);
        }
        self.nodes.shrink_to_fit();
        self.free_ids.shrink_to_fit();
        self.by_key.shrink_to_fit();
        self.chain_dups.shrink_to_fit();
    }

    fn metadata_bytes(&self) -> u64 {
        let nodes = self.nodes.capacity() * std::mem::size_of::<Option<NodeInfo>>();
        let map = self.by_key.capacity() * (8 + 4 + 1);
        // Chains' dup lists, estimated from the counts (walking them per call would cost O(n)).
        let chains = self.chain_dups.capacity() * 24 + self.stats.dups as usize * 4;
        (nodes + map + chains + self.free_ids.capacity() * 4) as u64
    }
}

/// A boxed tree is a tree (an engine picks its tree at run time: in-process
/// or a daemon's).
impl<T: StableTree + ?Sized> StableTree for Box<T> {
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>) {
        (**self).apply(ops, out)
    }
    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        (**self).set_max_page_sharing(max)
    }
    fn max_page_sharing(&self) -> u32 {
        (**self).max_page_sharing()
    }
    fn stats(&self) -> StableStats {
        (**self).stats()
    }
    fn held_stats(&self) -> StableStats {
        (**self).held_stats()
    }
    fn nodes(&self, out: &mut Vec<NodeInfo>) {
        (**self).nodes(out)
    }
    fn chains(&self) -> Vec<Vec<NodeInfo>> {
        (**self).chains()
    }
    fn prune(&mut self) -> u64 {
        (**self).prune()
    }
    fn metadata_bytes(&self) -> u64 {
        (**self).metadata_bytes()
    }
    fn shrink(&mut self) {
        (**self).shrink()
    }
    fn take_orphans(&mut self) -> Vec<Slot> {
        (**self).take_orphans()
    }
    fn keeps_orphans(&self) -> bool {
        (**self).keeps_orphans()
    }
    fn return_orphans(&mut self, slots: &[Slot]) {
        (**self).return_orphans(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(t: &mut LocalStableTree, op: StableOp) -> StableReply {
        let mut out = Vec::new();
        t.apply(&[op], &mut out);
        out[0]
    }

    fn insert(t: &mut LocalStableTree, slot: u64, key: u64, mappings: u32) -> NodeId {
        let op = StableOp::Insert { slot: Slot(slot), key, domain: Domain(0), mappings, indexed: true };
        match one(t, op) {
            StableReply::Inserted(n) => n,
            r => panic!("{r:?}"),
        }
    }

    fn acquire(t: &mut LocalStableTree, key: u64) -> StableReply {
        one(t, StableOp::Acquire { key, domain: Domain(0) })
    }

    #[test]
    fn chains_form_prune_and_pick_the_busiest_dup() {
        let mut t = LocalStableTree::new(4);
        let a = insert(&mut t, 0, 7, 4);
        assert_eq!(acquire(&mut t, 7), StableReply::Full);
        assert_eq!(acquire(&mut t, 8), StableReply::Absent);
        let b = insert(&mut t, 1, 7, 2);
        let c = insert(&mut t, 2, 7, 3);
        assert_eq!((t.stats().chains, t.stats().dups), (1, 3));
        // The head (a) is full: the busiest dup with room moves there.
        assert_eq!(acquire(&mut t, 7), StableReply::Acquired { node: c, slot: Slot(2) }, "busiest dup with room");
        assert_eq!(acquire(&mut t, 7), StableReply::Acquired { node: b, slot: Slot(1) });
        assert_eq!(acquire(&mut t, 7), StableReply::Acquired { node: b, slot: Slot(1) }, "the head keeps taking");
        assert_eq!(acquire(&mut t, 7), StableReply::Full);
        assert_eq!(t.stats(), StableStats { nodes: 3, mappings: 12, chains: 1, dups: 3 });
        for _ in 0..4 {
            one(&mut t, StableOp::Release { node: b });
        }
        assert_eq!(one(&mut t, StableOp::Release { node: c }), StableReply::Released { freed: None });
        for _ in 0..2 {
            one(&mut t, StableOp::Release { node: c });
        }
        assert_eq!(one(&mut t, StableOp::Release { node: c }), StableReply::Released { freed: Some(Slot(2)) });
        assert_eq!((t.stats().chains, t.stats().dups), (1, 1), "a chain keeps its last dup until pruned");
        assert_eq!(t.prune(), 1);
        assert_eq!((t.stats().chains, t.stats().dups), (0, 0));
        assert!(matches!(one(&mut t, StableOp::Find { key: 7 }), StableReply::Found(Some(n)) if n.id == a));
    }

    #[test]
    fn a_batch_is_carried_out_in_order() {
        let mut t = LocalStableTree::new(2);
        let a = insert(&mut t, 0, 7, 1);
        let mut out = Vec::new();
        let acq = StableOp::Acquire { key: 7, domain: Domain(0) };
        t.apply(&[acq, acq, StableOp::Release { node: a }, acq], &mut out);
        assert_eq!(
            out,
            vec![
                StableReply::Acquired { node: a, slot: Slot(0) },
                StableReply::Full,
                StableReply::Released { freed: None },
                StableReply::Acquired { node: a, slot: Slot(0) },
            ]
        );
        assert_eq!(acquire(&mut t, 7), StableReply::Full);
        assert_eq!(one(&mut t, StableOp::Acquire { key: 7, domain: Domain(1) }), StableReply::Full);
    }

    #[test]
    fn max_page_sharing_changes_only_while_no_node_has_mappings() {
        let mut t = LocalStableTree::new(4);
        let a = insert(&mut t, 0, 7, 1);
        let busy = t.set_max_page_sharing(8).unwrap_err();
        assert_eq!((busy.errno(), busy), (16, TunableError::Busy { pages_shared: 1 }));
        t.set_max_page_sharing(4).expect("no change is no change");
        one(&mut t, StableOp::Release { node: a });
        t.set_max_page_sharing(8).unwrap();
    }
}
