//! What several processes share when they merge with each other: one stable
//! tree, one unstable tree and one pool ([`Shared`]), each process (a
//! *client*) holding handles that implement the scanner's traits.
//!
//! No system call lets one process map pages into another's anonymous
//! memory, so every process runs its own scanner ([`crate::Ksm`]) over its
//! own memory, and what they share is what a daemon owns: the stable tree
//! (with each client's mappings counted, so a client that dies gives them
//! back), the unstable tree (an entry of another client answers
//! [`UnstableReply::Elsewhere`]: the asking client makes its page a stable
//! page the other maps at its next visit), the pool's slots, and the slots
//! of stable pages whose last mapper died ([`Shared::take_orphans`]: a
//! surviving client frees their pages once nothing maps them).
//!
//! [`Shared`] is plain state with one method per request; the handles here
//! share it through `Rc<RefCell<..>>` inside one process (the simulation of
//! several processes the tests run deterministically), and `samepage
//! daemon` serves the same state over its socket.

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ClientId(pub u32);

/// The state several processes share.
#[derive(Debug)]
pub struct Shared {
    tree: LocalStableTree,
    /// Mappings of each node held by each client.
    held: HashMap<(ClientId, NodeId), u32>,
    /// Per client: nodes it maps and its mappings.
    totals: HashMap<ClientId, (u64, u64)>,
    /// The unstable tree: each entry's client and page.
    unstable: HashMap<u64, (ClientId, u64)>,
    pool: LocalPool,
    /// Slots of nodes whose last mappings died with their client: their
    /// pages wait for a surviving client to free them.
    orphans: Vec<Slot>,
}

impl Shared {
    /// Empty shared state: a tree enforcing `max_page_sharing`, a pool of
    /// `pool_slots` slots.
    pub fn new(max_page_sharing: u32, pool_slots: u64) -> Self {
        Shared {
            tree: LocalStableTree::new(max_page_sharing),
            held: HashMap::new(),
            totals: HashMap::new(),
            unstable: HashMap::new(),
            pool: LocalPool::new(pool_slots),
            orphans: Vec::new(),
        }
    }

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

    /// [`StableTree::apply`] for `client`.
    pub fn stable_apply(&mut self, client: ClientId, ops: &[StableOp], out: &mut Vec<StableReply>) {
        self.tree.apply(ops, out);
        for (op, reply) in ops.iter().zip(out.iter()) {
            match (*op, *reply) {
                (StableOp::Acquire { .. } | StableOp::AcquireNode { .. }, StableReply::Acquired { node, .. }) => {
                    self.hold(client, node, 1)
                }
                (StableOp::Release { node }, StableReply::Released { .. }) => self.hold(client, node, -1),
                (StableOp::Insert { mappings, .. }, StableReply::Inserted(node)) => {
                    self.hold(client, node, i64::from(mappings))
                }
                _ => {}
            }
        }
    }

    /// [`StableTree::set_max_page_sharing`]: the tree's, for every client.
    pub fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        self.tree.set_max_page_sharing(max)
    }

    /// The `max_page_sharing` in force.
    pub fn max_page_sharing(&self) -> u32 {
        self.tree.max_page_sharing()
    }

    /// The whole tree's totals (system-wide counters).
    pub fn stats(&self) -> StableStats {
        self.tree.stats()
    }

    /// The nodes `client` maps and its mappings (chains and dups are the
    /// whole tree's).
    pub fn held_stats(&self, client: ClientId) -> StableStats {
        let (nodes, mappings) = self.totals.get(&client).copied().unwrap_or_default();
        StableStats { nodes, mappings, ..self.tree.stats() }
    }

    /// The nodes `client` maps, with the mappings it holds.
    pub fn nodes(&self, client: ClientId, out: &mut Vec<NodeInfo>) {
        let mut all = Vec::new();
        self.tree.nodes(&mut all);
        out.extend(
            all.into_iter().filter_map(|n| self.held.get(&(client, n.id)).map(|&mappings| NodeInfo { mappings, ..n })),
        );
    }

    /// Every node with its mappings over all clients.
    pub fn all_nodes(&self) -> Vec<NodeInfo> {
        let mut out = Vec::new();
        self.tree.nodes(&mut out);
        out
    }

    /// Every chain, with the mappings of all clients (rooms are global).
    pub fn chains(&self) -> Vec<Vec<NodeInfo>> {
        self.tree.chains()
    }

    /// [`StableTree::prune`].
    pub fn prune(&mut self) -> u64 {
        self.tree.prune()
    }

    /// Bytes the stable tree and its per-client counts use.
    pub fn stable_metadata_bytes(&self) -> u64 {
        self.tree.metadata_bytes() + (self.held.capacity() * 16) as u64
    }

    /// [`StableTree::shrink`].
    pub fn shrink(&mut self) {
        self.tree.shrink();
    }

    /// [`UnstableTree::apply`] for `client`: an entry of another client
    /// answers [`UnstableReply::Elsewhere`].
    pub fn unstable_apply(&mut self, client: ClientId, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        let holder = |(c, page): (ClientId, u64)| {
            if c == client {
                UnstableReply::Match(PageRef::unpack(page))
            } else {
                UnstableReply::Elsewhere(RemoteHolder(u64::from(c.0)))
            }
        };
        out.clear();
        for op in ops {
            out.push(match *op {
                UnstableOp::SearchInsert { key, page } => match self.unstable.remove(&key) {
                    Some(e) => holder(e),
                    None => {
                        self.unstable.insert(key, (client, page.pack()));
                        UnstableReply::Filed
                    }
                },
                UnstableOp::Take { key } => self.unstable.remove(&key).map_or(UnstableReply::Empty, holder),
                UnstableOp::Insert { key, page } => {
                    self.unstable.insert(key, (client, page.pack()));
                    UnstableReply::Inserted
                }
            });
        }
    }

    /// `client`'s unstable-tree entries go (its full scan starts over).
    pub fn unstable_clear(&mut self, client: ClientId) {
        self.unstable.retain(|_, (c, _)| *c != client);
    }

    /// `client`'s unstable-tree entries.
    pub fn unstable_len(&self, client: ClientId) -> usize {
        self.unstable.values().filter(|(c, _)| *c == client).count()
    }

    /// Entries of the unstable tree, every client's (a client's go when it
    /// does).
    pub fn unstable_total(&self) -> usize {
        self.unstable.len()
    }

    /// Bytes the unstable tree uses.
    pub fn unstable_metadata_bytes(&self) -> u64 {
        (self.unstable.capacity() * (8 + 4 + 8 + 1)) as u64
    }

    /// [`StablePool::alloc`].
    pub fn pool_alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        self.pool.alloc(hints, out)
    }

    /// [`StablePool::free`].
    pub fn pool_free(&mut self, slots: &[Slot]) {
        self.pool.free(slots)
    }

    /// Slots in use.
    pub fn pool_in_use(&self) -> u64 {
        self.pool.in_use()
    }

    /// Bytes of the pool's bookkeeping.
    pub fn pool_metadata_bytes(&self) -> u64 {
        self.pool.metadata_bytes()
    }

    /// Bytes of all of it: stable tree, unstable tree and pool bookkeeping.
    pub fn metadata_bytes(&self) -> u64 {
        self.stable_metadata_bytes() + self.unstable_metadata_bytes() + self.pool_metadata_bytes()
    }

    /// `client` is gone (its process exited or was killed): every mapping it
    /// held is given back, its unstable-tree entries go, and the slots of
    /// nodes left with no mapping become orphans (see [`Shared::take_orphans`]).
    pub fn client_gone(&mut self, client: ClientId) {
        let held: Vec<(NodeId, u32)> =
            self.held.iter().filter(|((c, _), _)| *c == client).map(|((_, n), k)| (*n, *k)).collect();
        let mut out = Vec::new();
        for (node, k) in held {
            let ops = vec![StableOp::Release { node }; k as usize];
            self.tree.apply(&ops, &mut out);
            self.orphans.extend(out.iter().filter_map(|r| match r {
                StableReply::Released { freed } => *freed,
                _ => None,
            }));
            self.held.remove(&(client, node));
        }
        self.totals.remove(&client);
        self.unstable_clear(client);
    }

    /// Slots of stable pages whose last mapping died with its client. A
    /// surviving client frees their pages with its page space (which checks
    /// nothing maps them) and gives back with [`Shared::pool_free`] the ones
    /// freed, with [`Shared::return_orphans`] the ones still mapped.
    pub fn take_orphans(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.orphans)
    }

    /// Orphan slots whose pages could not be freed yet.
    pub fn return_orphans(&mut self, slots: &[Slot]) {
        self.orphans.extend_from_slice(slots);
    }

    /// Orphan slots waiting.
    pub fn orphans(&self) -> usize {
        self.orphans.len()
    }
}

/// A handle on [`Shared`] state inside one process.
pub type SharedHandle = Rc<RefCell<Shared>>;

/// A client's handle on the shared stable tree.
#[derive(Clone, Debug)]
pub struct SharedStableTree {
    client: ClientId,
    inner: SharedHandle,
}

impl SharedStableTree {
    /// `client`'s handle on `shared`.
    pub fn new(shared: &SharedHandle, client: ClientId) -> Self {
        SharedStableTree { client, inner: Rc::clone(shared) }
    }
}

impl StableTree for SharedStableTree {
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>) {
        self.inner.borrow_mut().stable_apply(self.client, ops, out)
    }

    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        self.inner.borrow_mut().set_max_page_sharing(max)
    }

    fn max_page_sharing(&self) -> u32 {
        self.inner.borrow().max_page_sharing()
    }

    fn stats(&self) -> StableStats {
        self.inner.borrow().stats()
    }

    fn held_stats(&self) -> StableStats {
        self.inner.borrow().held_stats(self.client)
    }

    fn nodes(&self, out: &mut Vec<NodeInfo>) {
        self.inner.borrow().nodes(self.client, out)
    }

    fn chains(&self) -> Vec<Vec<NodeInfo>> {
        self.inner.borrow().chains()
    }

    fn prune(&mut self) -> u64 {
        self.inner.borrow_mut().prune()
    }

    fn metadata_bytes(&self) -> u64 {
        self.inner.borrow().stable_metadata_bytes()
    }

    fn shrink(&mut self) {
        self.inner.borrow_mut().shrink();
    }

    fn take_orphans(&mut self) -> Vec<Slot> {
        self.inner.borrow_mut().take_orphans()
    }

    fn keeps_orphans(&self) -> bool {
        true
    }

    fn return_orphans(&mut self, slots: &[Slot]) {
        self.inner.borrow_mut().return_orphans(slots)
    }
}

/// A client's handle on the shared unstable tree. Each client's entries
/// live until that client's next full scan starts, as a process's pages in
/// the kernel's unstable tree live until ksmd's.
#[derive(Clone, Debug)]
pub struct SharedUnstableTree {
    client: ClientId,
    inner: SharedHandle,
}

impl SharedUnstableTree {
    /// `client`'s handle on `shared`.
    pub fn new(shared: &SharedHandle, client: ClientId) -> Self {
        SharedUnstableTree { client, inner: Rc::clone(shared) }
    }
}

impl UnstableTree for SharedUnstableTree {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        self.inner.borrow_mut().unstable_apply(self.client, ops, out)
    }

    fn clear(&mut self) {
        self.inner.borrow_mut().unstable_clear(self.client);
    }

    fn clear_and_shrink(&mut self) {
        self.clear();
    }

    fn len(&self) -> usize {
        self.inner.borrow().unstable_len(self.client)
    }

    fn metadata_bytes(&self) -> u64 {
        self.inner.borrow().unstable_metadata_bytes()
    }
}

/// A client's handle on the shared pool's slots.
#[derive(Clone, Debug)]
pub struct SharedPool {
    inner: SharedHandle,
}

impl SharedPool {
    /// A handle on `shared`'s pool.
    pub fn new(shared: &SharedHandle) -> Self {
        SharedPool { inner: Rc::clone(shared) }
    }
}

impl StablePool for SharedPool {
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        self.inner.borrow_mut().pool_alloc(hints, out)
    }

    fn free(&mut self, slots: &[Slot]) {
        self.inner.borrow_mut().pool_free(slots)
    }

    fn in_use(&self) -> u64 {
        self.inner.borrow().pool_in_use()
    }

    fn metadata_bytes(&self) -> u64 {
        self.inner.borrow().pool_metadata_bytes()
    }
}

/// System-wide counters from the clients' own and the shared stable tree's
/// totals: events and link tallies add up; `pages_shared`,
/// `pages_sharing`, the chains and dups, and `pages_volatile` follow from
/// the tree, as the kernel's `/sys/kernel/mm/ksm` counters do.
pub fn system_counters<'a>(clients: impl IntoIterator<Item = &'a Counters>, stable: StableStats) -> Counters {
    // Each client counts its own full scans (they are not summed): the
    // busiest client's.
    let mut sum = Counters::sum(clients);
    sum.derive_from_stable(&stable);
    sum
}
