//! What several processes share when they merge with each other: one stable
//! tree, one unstable tree and one pool, each process (a *client*) holding a
//! handle that implements the scanner's traits.
//!
//! No system call lets one process map pages into another's anonymous
//! memory, so every process runs its own scanner ([`crate::Ksm`]) over its
//! own memory, and what they share is what a daemon owns: the stable tree
//! (with each client's mappings counted, so a client that dies gives them
//! back), the unstable tree (an entry of another client answers
//! [`UnstableReply::Elsewhere`]: the asking client makes its page a stable
//! page the other maps at its next visit), and the pool's slots. These
//! handles share through `Rc<RefCell<..>>` inside one process: that is the
//! simulation of several processes the tests run deterministically, and the
//! state a daemon serves over its socket.

use crate::counters::Counters;
use crate::page::{NodeId, PageRef, Slot};
use crate::pool::{LocalPool, SlotHint, StablePool};
use crate::stable::{LocalStableTree, NodeInfo, StableOp, StableReply, StableStats, StableTree};
use crate::tunables::TunableError;
use crate::unstable::{RemoteHolder, UnstableOp, UnstableReply, UnstableTree};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A client of the shared state (a process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u32);

#[derive(Debug)]
struct StableState {
    tree: LocalStableTree,
    /// Mappings of each node held by each client.
    held: HashMap<(ClientId, NodeId), u32>,
    /// Per client: nodes it maps and its mappings.
    totals: HashMap<ClientId, (u64, u64)>,
}

impl StableState {
    fn hold(&mut self, client: ClientId, node: NodeId, n: i64) {
        let e = self.held.entry((client, node)).or_default();
        let before = *e;
        *e = e.checked_add_signed(n as i32).expect("a client gives back only what it holds");
        let after = *e;
        if after == 0 {
            self.held.remove(&(client, node));
        }
        let t = self.totals.entry(client).or_default();
        t.1 = t.1.checked_add_signed(n).expect("totals in step");
        match (before, after) {
            (0, a) if a > 0 => t.0 += 1,
            (b, 0) if b > 0 => t.0 -= 1,
            _ => {}
        }
    }
}

/// A client's handle on the shared stable tree.
#[derive(Clone, Debug)]
pub struct SharedStableTree {
    client: ClientId,
    inner: Rc<RefCell<StableState>>,
}

impl SharedStableTree {
    /// A shared tree, and the handle of client 0.
    pub fn new(max_page_sharing: u32) -> Self {
        let state =
            StableState { tree: LocalStableTree::new(max_page_sharing), held: HashMap::new(), totals: HashMap::new() };
        SharedStableTree { client: ClientId(0), inner: Rc::new(RefCell::new(state)) }
    }

    /// The handle of another client of the same tree.
    pub fn client(&self, client: ClientId) -> Self {
        SharedStableTree { client, inner: Rc::clone(&self.inner) }
    }

    /// This handle's client.
    pub fn id(&self) -> ClientId {
        self.client
    }

    /// The client is gone (its process exited or was killed): every mapping
    /// it held is given back. Returns the slots of nodes left with none,
    /// whose pages can be freed once nothing maps them.
    pub fn client_gone(&self) -> Vec<Slot> {
        let mut st = self.inner.borrow_mut();
        let held: Vec<(NodeId, u32)> =
            st.held.iter().filter(|((c, _), _)| *c == self.client).map(|((_, n), k)| (*n, *k)).collect();
        let mut freed = Vec::new();
        let mut out = Vec::new();
        for (node, k) in held {
            let ops = vec![StableOp::Release { node }; k as usize];
            st.tree.apply(&ops, &mut out);
            freed.extend(out.iter().filter_map(|r| match r {
                StableReply::Released { freed } => *freed,
                _ => None,
            }));
            st.held.remove(&(self.client, node));
        }
        st.totals.remove(&self.client);
        freed
    }

    /// Every node with its mappings over all clients.
    pub fn all_nodes(&self) -> Vec<NodeInfo> {
        let mut out = Vec::new();
        self.inner.borrow().tree.nodes(&mut out);
        out
    }
}

impl StableTree for SharedStableTree {
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>) {
        let mut st = self.inner.borrow_mut();
        st.tree.apply(ops, out);
        for (op, reply) in ops.iter().zip(out.iter()) {
            match (*op, *reply) {
                (StableOp::Acquire { .. } | StableOp::AcquireNode { .. }, StableReply::Acquired { node, .. }) => {
                    st.hold(self.client, node, 1)
                }
                (StableOp::Release { node }, StableReply::Released { .. }) => st.hold(self.client, node, -1),
                (StableOp::Insert { mappings, .. }, StableReply::Inserted(node)) => {
                    st.hold(self.client, node, i64::from(mappings))
                }
                _ => {}
            }
        }
    }

    /// The tree's, shared by every client: a change while any node exists
    /// is EBUSY, as for one engine.
    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        self.inner.borrow_mut().tree.set_max_page_sharing(max)
    }

    fn max_page_sharing(&self) -> u32 {
        self.inner.borrow().tree.max_page_sharing()
    }

    /// The whole tree's totals (system-wide counters).
    fn stats(&self) -> StableStats {
        self.inner.borrow().tree.stats()
    }

    /// The nodes this client maps and its mappings (chains and dups are the
    /// whole tree's).
    fn held_stats(&self) -> StableStats {
        let st = self.inner.borrow();
        let (nodes, mappings) = st.totals.get(&self.client).copied().unwrap_or_default();
        StableStats { nodes, mappings, ..st.tree.stats() }
    }

    /// The nodes this client maps, with the mappings it holds.
    fn nodes(&self, out: &mut Vec<NodeInfo>) {
        let st = self.inner.borrow();
        let mut all = Vec::new();
        st.tree.nodes(&mut all);
        out.extend(
            all.into_iter()
                .filter_map(|n| st.held.get(&(self.client, n.id)).map(|&mappings| NodeInfo { mappings, ..n })),
        );
    }

    /// Every chain, with the mappings of all clients (rooms are global).
    fn chains(&self) -> Vec<Vec<NodeInfo>> {
        self.inner.borrow().tree.chains()
    }

    fn prune(&mut self) -> u64 {
        self.inner.borrow_mut().tree.prune()
    }

    fn metadata_bytes(&self) -> u64 {
        let st = self.inner.borrow();
        st.tree.metadata_bytes() + (st.held.capacity() * 16) as u64
    }

    fn shrink(&mut self) {
        self.inner.borrow_mut().tree.shrink();
    }
}

/// A client's handle on the shared unstable tree. Each client's entries
/// live until that client's next full scan starts, as a process's pages in
/// the kernel's unstable tree live until ksmd's.
#[derive(Clone, Debug)]
pub struct SharedUnstableTree {
    client: ClientId,
    inner: Rc<RefCell<HashMap<u64, (ClientId, u64)>>>,
}

impl Default for SharedUnstableTree {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedUnstableTree {
    /// A shared tree, and the handle of client 0.
    pub fn new() -> Self {
        SharedUnstableTree { client: ClientId(0), inner: Rc::default() }
    }

    /// The handle of another client of the same tree.
    pub fn client(&self, client: ClientId) -> Self {
        SharedUnstableTree { client, inner: Rc::clone(&self.inner) }
    }

    /// The client is gone: its entries go.
    pub fn client_gone(&self) {
        self.inner.borrow_mut().retain(|_, (c, _)| *c != self.client);
    }

    fn holder(&self, (client, page): (ClientId, u64)) -> UnstableReply {
        if client == self.client {
            UnstableReply::Match(PageRef::unpack(page))
        } else {
            UnstableReply::Elsewhere(RemoteHolder(u64::from(client.0)))
        }
    }
}

impl UnstableTree for SharedUnstableTree {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        out.clear();
        let mut map = self.inner.borrow_mut();
        for op in ops {
            out.push(match *op {
                UnstableOp::SearchInsert { key, page } => match map.remove(&key) {
                    Some(e) => self.holder(e),
                    None => {
                        map.insert(key, (self.client, page.pack()));
                        UnstableReply::Filed
                    }
                },
                UnstableOp::Take { key } => map.remove(&key).map_or(UnstableReply::Empty, |e| self.holder(e)),
                UnstableOp::Insert { key, page } => {
                    map.insert(key, (self.client, page.pack()));
                    UnstableReply::Inserted
                }
            });
        }
    }

    fn clear(&mut self) {
        self.client_gone();
    }

    fn clear_and_shrink(&mut self) {
        self.client_gone();
    }

    fn len(&self) -> usize {
        self.inner.borrow().values().filter(|(c, _)| *c == self.client).count()
    }

    fn metadata_bytes(&self) -> u64 {
        (self.inner.borrow().capacity() * (8 + 4 + 8 + 1)) as u64
    }
}

/// A client's handle on the shared pool's slots.
#[derive(Clone, Debug)]
pub struct SharedPool {
    inner: Rc<RefCell<LocalPool>>,
}

impl SharedPool {
    /// A shared pool of `capacity` slots.
    pub fn new(capacity: u64) -> Self {
        SharedPool { inner: Rc::new(RefCell::new(LocalPool::new(capacity))) }
    }
}

impl StablePool for SharedPool {
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        self.inner.borrow_mut().alloc(hints, out)
    }

    fn free(&mut self, slots: &[Slot]) {
        self.inner.borrow_mut().free(slots)
    }

    fn in_use(&self) -> u64 {
        self.inner.borrow().in_use()
    }

    fn metadata_bytes(&self) -> u64 {
        self.inner.borrow().metadata_bytes()
    }
}

/// System-wide counters from the clients' own and the shared stable tree's
/// totals: events and link tallies add up; `pages_shared`,
/// `pages_sharing`, the chains and dups, and `pages_volatile` follow from
/// the tree, as the kernel's `/sys/kernel/mm/ksm` counters do.
pub fn system_counters<'a>(clients: impl IntoIterator<Item = &'a Counters>, stable: StableStats) -> Counters {
    let mut sum = Counters::default();
    let mut max_full_scans = 0;
    for c in clients {
        sum.add(c);
        max_full_scans = max_full_scans.max(c.full_scans);
    }
    sum.pages_shared = stable.nodes;
    sum.pages_sharing = stable.mappings - stable.nodes;
    sum.stable_node_chains = stable.chains;
    sum.stable_node_dups = stable.dups;
    sum.pages_volatile = sum.rmap_items.saturating_sub(stable.mappings + sum.pages_unshared);
    sum.general_profit = (sum.pages_saved() * crate::PAGE_SIZE as u64) as i64 - sum.metadata_bytes as i64;
    // Each client counts its own full scans (they are not summed): the
    // busiest client's.
    sum.full_scans = max_full_scans;
    sum
}
