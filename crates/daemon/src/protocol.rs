//! The wire protocol between a process's engine and the daemon: one
//! [`Request`] answered by one [`Response`], each a frame of a 4-byte
//! little-endian length and the value in `postcard` encoding. A request
//! carries a whole batch of tree or pool operations (one round trip per
//! batch of pages, never one per page).

use samepage_core::pool::SlotHint;
use samepage_core::shared::ClientId;
use samepage_core::stable::{NodeInfo, StableOp, StableReply, StableStats};
use samepage_core::unstable::{UnstableOp, UnstableReply};
use samepage_core::{Counters, Slot, Tunables};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};

/// The protocol's version; a client of another version is refused.
pub const VERSION: u32 = 4;

/// The largest frame accepted (a batch of a few hundred thousand ops).
pub const MAX_FRAME: usize = 64 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The first request: the client's protocol version and its trust
    /// domain (its partition is its user's and this domain's).
    Hello {
        /// [`VERSION`].
        version: u32,
        /// The client's domain inside its user's partition.
        domain: u32,
    },
    /// A batch for the stable tree.
    Stable(Vec<StableOp>),
    /// A batch for the unstable tree.
    Unstable(Vec<UnstableOp>),
    /// The client's unstable-tree entries go (its full scan starts over).
    UnstableClear,
    /// Pool slots, one per hint.
    Alloc(Vec<SlotHint>),
    /// Pool slots whose pages the client freed.
    Free(Vec<Slot>),
    /// The partition's totals and the client's own.
    Stats,
    /// The nodes the client maps.
    Nodes,
    /// The partition's chains.
    Chains,
    /// Collapses chains left with one dup.
    Prune,
    /// Slots of stable pages whose last mapper died, for the client to free.
    TakeOrphans,
    /// Orphan slots the client could not free yet.
    ReturnOrphans(Vec<Slot>),
    /// Every partition and client (for `samepage status`).
    Status,
    /// The client's own figures, as `/proc/PID/ksm_stat` names them;
    /// answered with [`Response::Orders`].
    Report(ProcessStatus),
    /// Sets a system-wide tunable by its sysfs name (`samepage set`):
    /// validated as the kernel does (same errno); only root and the
    /// daemon's own user may (`EACCES`, as writing `/sys/kernel/mm/ksm`).
    Set {
        /// The tunable's sysfs name.
        name: String,
        /// Its value, as written to the sysfs file.
        value: String,
    },
    /// The system-wide tunables.
    Tunables,
    /// Merge every mergeable page of process `pid` now (`samepage merge
    /// --pid`): answered with the orders' ids ([`Response::MergeOrdered`]);
    /// the process reports the outcome ([`ProcessStatus::merged_now`]).
    MergePid(i32),
}

/// What the daemon tells a client when it reports (a few times a second).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    /// The system-wide tunables in force.
    pub tunables: Tunables,
    /// This client's share of `pages_to_scan`: the machine-wide rate shared
    /// out in proportion to the pages each client registered, as ksmd's
    /// one scan over every process's memory gives each process.
    pub pages_to_scan: u32,
    /// Merge everything now, under this order's id.
    pub merge_now: Option<u64>,
    /// The processes of the client's partition: the only ones that may map
    /// its pool (a client frees a pool page only while no other process
    /// does, such as a client's forked child, whose mappings no page-table
    /// entry may show yet).
    pub pool_users: Vec<u32>,
}

/// The outcome of a merge ordered by `samepage merge --pid`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// The order's id.
    pub id: u64,
    /// Pages merged.
    pub pages: u64,
    /// Bytes saved (pages that now share a stable page or the zero page).
    pub saved_bytes: u64,
    /// The errno if the merge failed.
    pub errno: Option<i32>,
}

/// A client process's figures, with the kernel's `/proc/PID/ksm_stat` names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// The client.
    pub client: ClientId,
    /// Its process id (from the kernel's peer credentials).
    pub pid: i32,
    /// rmap items of its pages.
    pub ksm_rmap_items: u64,
    /// Its pages merged with the kernel's zero page.
    pub ksm_zero_pages: u64,
    /// Its pages that map a stable page.
    pub ksm_merging_pages: u64,
    /// What merging saves it, net of its metadata (bytes).
    pub ksm_process_profit: i64,
    /// Pages it registered as mergeable.
    pub ksm_mergeable: u64,
    /// CPU its engine's scanner spent (ns).
    pub cpu_ns: u64,
    /// Memory its engines take in it (bytes): the preload library's heap
    /// pages resident, as RSS counts them (a page still shared with the
    /// parent since a fork counts in each process); else the engine's
    /// metadata (`set_own_memory_probe`).
    pub memory_bytes: u64,
    /// Full scans its engine's scanner completed (`full_scans`).
    pub full_scans: u64,
    /// The last merge ordered through the daemon, once done.
    pub merged_now: Option<MergeOutcome>,
    /// The engine's own counters (`pages_scanned`, `pages_skipped`,
    /// `cow_faults`, ...), for the daemon's metrics and sysfs view; `None`
    /// from an engine that does not send them.
    pub counters: Option<Box<Counters>>,
}

/// What the daemon answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Welcome: the client's id and the partition's `max_page_sharing`;
    /// the partition's pool memfd comes with this frame (`SCM_RIGHTS`).
    Hello {
        /// The client's id.
        client: ClientId,
        /// The partition's `max_page_sharing`.
        max_page_sharing: u32,
        /// Slots of the pool memfd (its size in pages).
        pool_slots: u64,
    },
    /// Replies to a [`Request::Stable`] batch.
    Stable(Vec<StableReply>),
    /// Replies to a [`Request::Unstable`] batch.
    Unstable(Vec<UnstableReply>),
    /// Slots for a [`Request::Alloc`].
    Slots(Vec<Option<Slot>>),
    /// Done.
    Done,
    /// Totals.
    Stats {
        /// The partition's.
        partition: StableStats,
        /// The client's own.
        held: StableStats,
        /// The partition's `max_page_sharing`.
        max_page_sharing: u32,
        /// Bytes of the partition's metadata.
        metadata_bytes: u64,
        /// The client's unstable-tree entries.
        unstable: u64,
    },
    /// Nodes.
    Nodes(Vec<NodeInfo>),
    /// Chains.
    Chains(Vec<Vec<NodeInfo>>),
    /// Chains collapsed.
    Pruned(u64),
    /// Orphan slots.
    Orphans(Vec<Slot>),
    /// The system-wide tunables.
    Tunables(Tunables),
    /// For a [`Request::Report`].
    Orders(Orders),
    /// The ids of the merges ordered, one per engine of the process.
    MergeOrdered(Vec<u64>),
    /// The daemon's view.
    Status(Vec<PartitionStatus>),
    /// Refused: an errno and why.
    Error {
        /// The kernel-style error number (`EBUSY`, `EINVAL`, `EPROTO`).
        errno: i32,
        /// Why, naming the bad value.
        message: String,
    },
}

/// One partition as `samepage status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The user whose processes share it.
    pub uid: u32,
    /// The domain inside that user's processes.
    pub domain: u32,
    /// The stable tree's totals.
    pub stable: StableStats,
    /// Pool slots in use.
    pub slots_in_use: u64,
    /// Orphan slots waiting to be freed.
    pub orphans: u64,
    /// Bytes of memory the pool memfd holds (its allocated blocks).
    pub pool_bytes: u64,
    /// Requests its clients made (each a batch).
    pub requests: u64,
    /// Each client's last report.
    pub processes: Vec<ProcessStatus>,
    /// Entries of the partition's unstable tree (`pages_unshared`).
    pub unshared: u64,
    /// Bytes of the daemon's metadata for the partition (its stable and
    /// unstable trees and the pool's index).
    pub metadata_bytes: u64,
    /// Connected clients: id and process id.
    pub clients: Vec<(ClientId, i32)>,
    /// What the engines that left counted: their `pages_scanned`,
    /// `pages_skipped`, `cow_faults`, `merges` and `unmerges` added up,
    /// `full_scans` the most any of them reached. The partition's totals
    /// include them, so they never go back when an engine exits (or starts
    /// again after an `exec`, as a new client).
    pub gone: Counters,
}

/// A malformed or failed exchange.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed (the peer is gone: `UnexpectedEof`).
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLong(usize),
    /// The frame does not decode.
    #[error("bad frame: {0}")]
    Decode(#[from] postcard::Error),
}

/// One frame's bytes.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(value)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLong(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLong(body.len()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> Result<(), FrameError> {
    w.write_all(&encode(value)?)?;
    Ok(())
}

/// Reads one frame.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(postcard::from_bytes(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use samepage_core::{Domain, PageRef, RegionId};

    #[test]
    fn frames_round_trip_and_refuse_garbage() {
        let req = Request::Unstable(vec![UnstableOp::SearchInsert {
            key: 7,
            page: PageRef { region: RegionId(3), index: 9 },
        }]);
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        write_frame(&mut buf, &Request::Stable(vec![StableOp::Acquire { key: 1, domain: Domain(2) }])).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), req);
        assert!(matches!(read_frame::<Request>(&mut r).unwrap(), Request::Stable(_)));
        assert!(matches!(read_frame::<Request>(&mut r), Err(FrameError::Io(_))), "end of stream");
        let huge = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert!(matches!(read_frame::<Request>(&mut &huge[..]), Err(FrameError::TooLong(_))));
        let bad = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(read_frame::<Request>(&mut &bad[..]), Err(FrameError::Decode(_))));
    }
}
