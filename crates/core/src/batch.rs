//! The batch: merges decided by the scan, carried out together by the page
//! space once per chunk of pages (so runs of pages become one mapping), and
//! the decisions to undo for those the page space could not make.
//!
//! Each [`Intent`] the page space receives has beside it what the scanner
//! decided for it (the stable node whose mapping it took, or the dup it is
//! refiled from); [`Batch::carry_out`] gives every intent back with its
//! [`IntentResult`], for the scanner to keep or undo.

use crate::page::{NodeId, PageRef, Slot};
use crate::space::{Intent, IntentResult, PageSpace, Target};

/// What the scanner decided for one intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The stable node whose mapping the page took (none for a zero page).
    pub node: Option<NodeId>,
    /// For a refile (defragmentation): the dup the page maps now.
    pub refile_from: Option<NodeId>,
    /// The content's key (to put a page back in the unstable tree).
    pub key: u64,
}

/// One intent, its decision and what became of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The intent.
    pub intent: Intent,
    /// The decision behind it.
    pub decision: Decision,
    /// What the page space did.
    pub result: IntentResult,
}

/// A batch carried out: its intents, decisions and results, to walk with
/// [`Carried::outcomes`] and give back with [`Batch::recycle`] (the batch
/// keeps the allocations).
#[derive(Debug, Default)]
pub struct Carried {
    intents: Vec<Intent>,
    decisions: Vec<Decision>,
    results: Vec<IntentResult>,
}

impl Carried {
    /// Every intent with its decision and result.
    pub fn outcomes(&self) -> impl Iterator<Item = Outcome> + '_ {
        self.intents.iter().zip(&self.decisions).zip(&self.results).map(|((&intent, &decision), &result)| Outcome {
            intent,
            decision,
            result,
        })
    }
}

/// Merges decided and not yet carried out.
#[derive(Debug, Default)]
pub struct Batch {
    intents: Vec<Intent>,
    decisions: Vec<Decision>,
    results: Vec<IntentResult>,
}

impl Batch {
    /// Decides a merge of `page` into `target`.
    pub fn push(&mut self, page: PageRef, target: Target, decision: Decision) {
        self.intents.push(Intent { page, target });
        self.decisions.push(decision);
    }

    /// Decides a merge into stable node `node` (pool slot `slot`).
    pub fn push_stable(&mut self, page: PageRef, slot: Slot, node: NodeId, key: u64) {
        self.push(page, Target::Slot(slot), Decision { node: Some(node), refile_from: None, key });
    }

    /// Merges decided.
    pub fn len(&self) -> usize {
        self.intents.len()
    }

    /// Whether none is decided.
    pub fn is_empty(&self) -> bool {
        self.intents.is_empty()
    }

    /// Takes the decisions made since the batch had `mark` of them (to undo
    /// some: what is kept goes back with [`Batch::push`]).
    pub fn take_since(&mut self, mark: usize) -> Vec<(Intent, Decision)> {
        let intents = self.intents.split_off(mark);
        let decisions = self.decisions.split_off(mark);
        intents.into_iter().zip(decisions).collect()
    }

    /// The intents decided since `mark`.
    pub fn since(&self, mark: usize) -> &[Intent] {
        &self.intents[mark..]
    }

    /// Carries out every decided merge with [`PageSpace::merge`] and returns
    /// them with their results; the batch is empty until the [`Carried`]
    /// comes back with [`Batch::recycle`].
    pub fn carry_out(&mut self, space: &mut impl PageSpace) -> Carried {
        let mut results = std::mem::take(&mut self.results);
        results.clear();
        if !self.intents.is_empty() {
            space.merge(&self.intents, &mut results);
            results.resize(self.intents.len(), IntentResult::Failed);
        }
        Carried { intents: std::mem::take(&mut self.intents), decisions: std::mem::take(&mut self.decisions), results }
    }

    /// Takes back the buffers of a carried-out batch (cleared). No decision
    /// is made while a batch is carried out.
    pub fn recycle(&mut self, mut carried: Carried) {
        debug_assert!(self.intents.is_empty() && self.decisions.is_empty(), "decided while carrying out");
        carried.intents.clear();
        carried.decisions.clear();
        self.intents = carried.intents;
        self.decisions = carried.decisions;
        self.results = carried.results;
    }

    /// Bytes of the buffers.
    pub fn metadata_bytes(&self) -> u64 {
        (self.intents.capacity() * std::mem::size_of::<Intent>()
            + self.decisions.capacity() * std::mem::size_of::<Decision>()
            + self.results.capacity() * std::mem::size_of::<IntentResult>()) as u64
    }

    /// Gives memory back (no region left).
    pub fn shrink(&mut self) {
        *self = Self::default();
    }
}
