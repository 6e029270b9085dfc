//! The unstable tree: pages whose checksum held still for one scan, keyed by
//! content hash and thrown away at the end of every full scan (the kernel's
//! `root_unstable_tree`). Entries are candidates only: the page may have
//! changed since it was filed, which is why a merge compares full contents.
//!
//! [`UnstableTree`] is command-shaped and batched like the stable tree: the
//! scanner sends one [`UnstableOp`] per distinct content of a batch of pages
//! and acts on the [`UnstableReply`]s. A tree shared by several processes may
//! answer [`UnstableReply::Elsewhere`]: another process holds a page with
//! this content, so this one's page should become a stable page that the
//! other can map too.

use crate::page::PageRef;
use std::collections::HashMap;

/// One request to the unstable tree. A batch is carried out in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum UnstableOp {
    /// The kernel's `unstable_tree_search_insert`: take the page filed under
    /// `key` out of the tree, or file `page` there if there is none.
    SearchInsert {
        /// The content's key.
        key: u64,
        /// The page to file.
        page: PageRef,
    },
    /// Take the page filed under `key` out of the tree, filing nothing
    /// (several pages of the batch hold this content: they pair among
    /// themselves, with the filed page if there is one).
    Take {
        /// The content's key.
        key: u64,
    },
    /// File `page` under `key`, replacing any entry there (a stale entry,
    /// or a page put back after a merge that could not be made).
    Insert {
        /// The content's key.
        key: u64,
        /// The page.
        page: PageRef,
    },
}

/// What a holder outside this process is, for a tree shared between
/// processes: an opaque token the daemon understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RemoteHolder(pub u64);

/// The answer to one [`UnstableOp`], in the same position of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum UnstableReply {
    /// The page was filed (nothing was there).
    Filed,
    /// Nothing was filed under the key (a [`UnstableOp::Take`]).
    Empty,
    /// This page of this process was filed under the key; it is out of the
    /// tree now.
    Match(PageRef),
    /// A page of another process holds this content (a shared tree only):
    /// nothing was filed.
    Elsewhere(RemoteHolder),
    /// Done ([`UnstableOp::Insert`]).
    Inserted,
}

/// The unstable tree's interface.
pub trait UnstableTree {
    /// Carries out `ops` in order, writing one reply per op into `out`.
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>);
    /// Discards the tree (end of a full scan), keeping its allocation.
    fn clear(&mut self);
    /// Discards the tree and its allocation.
    fn clear_and_shrink(&mut self);
    /// Entries filed.
    fn len(&self) -> usize;
    /// Whether the tree is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of memory the tree uses.
    fn metadata_bytes(&self) -> u64;
}

/// The in-process unstable tree: pages packed into 8 bytes ([`PageRef::pack`]).
#[derive(Debug, Default)]
pub struct LocalUnstableTree {
    by_key: HashMap<u64, u64>,
}

impl LocalUnstableTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }
}

impl UnstableTree for LocalUnstableTree {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        use std::collections::hash_map::Entry;
        out.clear();
        for op in ops {
            out.push(match *op {
                UnstableOp::SearchInsert { key, page } => match self.by_key.entry(key) {
                    Entry::Occupied(e) => UnstableReply::Match(PageRef::unpack(e.remove())),
                    Entry::Vacant(v) => {
                        v.insert(page.pack());
                        UnstableReply::Filed
                    }
                },
                UnstableOp::Take { key } => {
                    self.by_key.remove(&key).map_or(UnstableReply::Empty, |p| UnstableReply::Match(PageRef::unpack(p)))
                }
                UnstableOp::Insert { key, page } => {
                    self.by_key.insert(key, page.pack());
                    UnstableReply::Inserted
                }
            });
        }
    }

    fn clear(&mut self) {
        self.by_key.clear();
    }

    fn clear_and_shrink(&mut self) {
        self.by_key = HashMap::new();
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn metadata_bytes(&self) -> u64 {
        (self.by_key.capacity() * (8 + 8 + 1)) as u64
    }
}

/// A boxed tree is a tree.
impl<T: UnstableTree + ?Sized> UnstableTree for Box<T> {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        (**self).apply(ops, out)
    }
    fn clear(&mut self) {
        (**self).clear()
    }
    fn clear_and_shrink(&mut self) {
        (**self).clear_and_shrink()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
    fn metadata_bytes(&self) -> u64 {
        (**self).metadata_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::RegionId;

    #[test]
    fn search_insert_pairs_and_take_empties() {
        let p = |i| PageRef { region: RegionId(3), index: i };
        let mut t = LocalUnstableTree::new();
        let mut out = Vec::new();
        t.apply(
            &[
                UnstableOp::SearchInsert { key: 1, page: p(0) },
                UnstableOp::SearchInsert { key: 1, page: p(1) },
                UnstableOp::Take { key: 1 },
                UnstableOp::Insert { key: 2, page: p(2) },
                UnstableOp::Take { key: 2 },
            ],
            &mut out,
        );
        use UnstableReply::*;
        assert_eq!(out, vec![Filed, Match(p(0)), Empty, Inserted, Match(p(2))]);
        assert!(t.is_empty());
    }
}
