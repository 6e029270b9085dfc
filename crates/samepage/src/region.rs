//! Mergeable memory owned by the engine.

use crate::engine::Shared;
use crate::sys::mapping::{AnonMapping, OutOfBounds};
use samepage_core::RegionId;
use std::sync::Arc;

/// Anonymous memory allocated by [`crate::Engine::alloc_region`], registered
/// as mergeable. Dropping it unregisters (unmerges) and unmaps it.
///
/// The memory may be shared by threads: [`Region::read`] and
/// [`Region::write`] copy with volatile accesses; [`Region::as_ptr`] gives the
/// raw address for callers who manage their own accesses.
pub struct Region {
    mapping: AnonMapping,
    id: RegionId,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("id", &self.id).field("len", &self.mapping.len()).finish()
    }
}

impl Region {
    pub(crate) fn new(mapping: AnonMapping, id: RegionId, shared: Arc<Shared>) -> Self {
        Region { mapping, id, shared }
    }

    /// The region's id (for counters).
    pub fn id(&self) -> RegionId {
        self.id
    }

    /// Start address.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    /// Length in bytes (whole pages).
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: a region has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies `data` in at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), OutOfBounds> {
        self.mapping.write(offset, data)
    }

    /// Copies bytes out from `offset`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.mapping.read(offset, buf)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // On failure (engine failed, no memory to unshare) the unmap below
        // discards the pages anyway.
        let _ = self.shared.unregister(self.id);
    }
}
