//! The client side: a connection to the daemon, and the stable tree,
//! unstable tree and pool a process's scanner uses through it
//! ([`RemoteStableTree`], [`RemoteUnstableTree`], [`RemotePool`]). Each
//! batch of the scanner is one request.
//!
//! If the daemon goes away, the connection is marked broken and every later
//! request answers what keeps the process's memory as it is: no stable page
//! found, nothing filed, no slot; mappings given back are forgotten (the
//! daemon that held them is gone). The engine's merged pages stay mapped and
//! byte-exact; nothing new merges until the process connects again.

use crate::protocol::{read_frame, write_frame, FrameError, Orders, PartitionStatus, Request, Response, VERSION};
use rustix::fd::OwnedFd;
use samepage_core::pool::{SlotHint, StablePool};
use samepage_core::shared::ClientId;
use samepage_core::stable::{NodeInfo, StableOp, StableReply, StableStats, StableTree};
use samepage_core::tunables::TunableError;
use samepage_core::unstable::{UnstableOp, UnstableReply, UnstableTree};
use samepage_core::{Slot, Tunables};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// A failed exchange with the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed (no daemon there: `ENOENT`,
    /// `ECONNREFUSED`).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The error, with its errno.
        source: std::io::Error,
    },
    /// The exchange failed (the daemon went away).
    #[error("daemon connection: {0}")]
    Frame(#[from] FrameError),
    /// The daemon refused the request.
    #[error("daemon refused: {message} (errno {errno})")]
    Refused {
        /// Its error number.
        errno: i32,
        /// Why.
        message: String,
    },
    /// The daemon answered something else than the request calls for.
    #[error("unexpected answer from the daemon: {0}")]
    Unexpected(String),
    /// An earlier exchange failed: the connection is unusable.
    #[error("the daemon connection is broken")]
    Broken,
}

impl ClientError {
    /// The error number, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Connect { source, .. } => source.raw_os_error(),
            ClientError::Frame(FrameError::Io(e)) => e.raw_os_error(),
            ClientError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    client: ClientId,
    max_page_sharing: u32,
    /// The partition's pool memfd and its slots, until taken.
    pool: Option<(OwnedFd, u64)>,
    broken: bool,
}

/// A connection shared by the handles of one engine.
pub type SharedConnection = Arc<Mutex<Connection>>;

fn lock(c: &SharedConnection) -> MutexGuard<'_, Connection> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connection {
    /// Connects to the daemon at `path` as a client of trust domain `domain`.
    pub fn connect(path: &Path, domain: u32) -> Result<SharedConnection, ClientError> {
        let mut stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        write_frame(&mut stream, &Request::Hello { version: VERSION, domain })?;
        let (hello, fd) = recv_with_fd(&mut stream)?;
        match hello {
            Response::Hello { client, max_page_sharing, pool_slots } => {
                let fd = fd.ok_or_else(|| ClientError::Unexpected("Hello without the pool's memfd".into()))?;
                Ok(Arc::new(Mutex::new(Connection {
                    stream,
                    client,
                    max_page_sharing,
                    pool: Some((fd, pool_slots)),
                    broken: false,
                })))
            }
            Response::Error { errno, message } => Err(ClientError::Refused { errno, message }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The partition's pool memfd and its size in slots (once: the engine
    /// maps its merged pages from it).
    pub fn take_pool(&mut self) -> Option<(OwnedFd, u64)> {
        self.pool.take()
    }

    /// The partition's `max_page_sharing` (the daemon's, for every client).
    pub fn max_page_sharing(&self) -> u32 {
        self.max_page_sharing
    }

    /// One request on a connection of its own (no Hello: requests about
    /// the whole daemon).
    fn once(path: &Path, req: &Request) -> Result<Response, ClientError> {
        let mut stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        write_frame(&mut stream, req)?;
        match read_frame::<Response>(&mut stream)? {
            Response::Error { errno, message } => Err(ClientError::Refused { errno, message }),
            r => Ok(r),
        }
    }

    /// The daemon's view of every partition (a connection of its own).
    pub fn status(path: &Path) -> Result<Vec<PartitionStatus>, ClientError> {
        match Self::once(path, &Request::Status)? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The system-wide tunables of the daemon at `path`.
    pub fn tunables(path: &Path) -> Result<Tunables, ClientError> {
        match Self::once(path, &Request::Tunables)? {
            Response::Tunables(t) => Ok(t),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sets a system-wide tunable of the daemon at `path` by its sysfs name;
    /// returns the tunables now in force. Refused as the kernel's sysfs
    /// refuses (its errno), and `EACCES` for users other than root and the
    /// daemon's own.
    pub fn set(path: &Path, name: &str, value: &str) -> Result<Tunables, ClientError> {
        match Self::once(path, &Request::Set { name: name.into(), value: value.into() })? {
            Response::Tunables(t) => Ok(t),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Orders the engines of process `pid` to merge everything now; returns
    /// the orders' ids (their outcomes come in the process's status).
    pub fn merge_pid(path: &Path, pid: i32) -> Result<Vec<u64>, ClientError> {
        match Self::once(path, &Request::MergePid(pid))? {
            Response::MergeOrdered(ids) => Ok(ids),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// This client's id.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// Tells the daemon this process's figures (`samepage status` shows
    /// them); the daemon answers with the tunables in force, this
    /// process's share of `pages_to_scan` and any merge it ordered.
    pub fn report(&mut self, r: crate::protocol::ProcessStatus) -> Result<Orders, ClientError> {
        match self.call(&Request::Report(r))? {
            Response::Orders(o) => Ok(o),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Whether an exchange failed.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// One request and its answer.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let r = write_frame(&mut self.stream, req).and_then(|()| read_frame::<Response>(&mut self.stream));
        match r {
            Ok(Response::Error { errno, message }) => Err(ClientError::Refused { errno, message }),
            Ok(resp) => Ok(resp),
            Err(e) => {
                self.broken = true;
                Err(e.into())
            }
        }
    }
}

/// Reads one frame and the file descriptor that may ride on its first byte.
fn recv_with_fd(stream: &mut UnixStream) -> Result<(Response, Option<OwnedFd>), ClientError> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut first = [0u8; 4096];
    let got = rustix::net::recvmsg(
        &*stream,
        &mut [std::io::IoSliceMut::new(&mut first)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| ClientError::Frame(FrameError::Io(e.into())))?
    .bytes;
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    // The frame: what came with the descriptor, then the rest of it.
    let value = read_frame(&mut std::io::Read::chain(&first[..got], &mut *stream))?;
    Ok((value, fd))
}

/// The stable tree, served by the daemon.
#[derive(Debug, Clone)]
pub struct RemoteStableTree {
    conn: SharedConnection,
    /// The daemon's last answer to `Stats`: what the counters show while
    /// it is gone (the merged pages stay as they were).
    last: std::cell::Cell<Option<(StableStats, StableStats, u64, u64)>>,
}

impl RemoteStableTree {
    /// The stable tree of `conn`'s partition.
    pub fn new(conn: &SharedConnection) -> Self {
        RemoteStableTree { conn: Arc::clone(conn), last: std::cell::Cell::new(None) }
    }

    fn stats_call(&self) -> Option<(StableStats, StableStats, u64, u64)> {
        match lock(&self.conn).call(&Request::Stats) {
            Ok(Response::Stats { partition, held, metadata_bytes, unstable, .. }) => {
                self.last.set(Some((partition, held, metadata_bytes, unstable)));
                Some((partition, held, metadata_bytes, unstable))
            }
            _ => self.last.get(),
        }
    }
}

/// What a batch gets when the daemon cannot answer: nothing found, nothing
/// made (an insert answered `Full` gives its slot back).
fn stable_fallback(ops: &[StableOp], out: &mut Vec<StableReply>) {
    out.clear();
    out.extend(ops.iter().map(|op| match op {
        StableOp::Acquire { .. } | StableOp::AcquireNode { .. } | StableOp::Insert { .. } => StableReply::Full,
        StableOp::Release { .. } => StableReply::Released { freed: None },
        StableOp::Find { .. } => StableReply::Found(None),
    }));
}

impl StableTree for RemoteStableTree {
    fn apply(&mut self, ops: &[StableOp], out: &mut Vec<StableReply>) {
        // Nothing to ask: no round trip.
        if ops.is_empty() {
            out.clear();
            return;
        }
        match lock(&self.conn).call(&Request::Stable(ops.to_vec())) {
            Ok(Response::Stable(replies)) if replies.len() == ops.len() => *out = replies,
            _ => stable_fallback(ops, out),
        }
    }

    /// `max_page_sharing` is the daemon's, system-wide (`samepage set`
    /// changes it for every partition): a client follows it and cannot set
    /// another value.
    fn set_max_page_sharing(&mut self, max: u32) -> Result<(), TunableError> {
        let mut c = lock(&self.conn);
        if max == c.max_page_sharing {
            return Ok(());
        }
        match c.call(&Request::Stats) {
            Ok(Response::Stats { max_page_sharing, .. }) if max_page_sharing == max => {
                c.max_page_sharing = max;
                Ok(())
            }
            _ => Err(TunableError::Refused {
                name: "max_page_sharing",
                why: "it is the daemon's, system-wide: change it with `samepage set`",
            }),
        }
    }

    fn max_page_sharing(&self) -> u32 {
        lock(&self.conn).max_page_sharing
    }

    fn stats(&self) -> StableStats {
        self.stats_call().map(|s| s.0).unwrap_or_default()
    }

    fn held_stats(&self) -> StableStats {
        self.stats_call().map(|s| s.1).unwrap_or_default()
    }

    fn nodes(&self, out: &mut Vec<NodeInfo>) {
        if let Ok(Response::Nodes(n)) = lock(&self.conn).call(&Request::Nodes) {
            out.extend(n);
        }
    }

    fn chains(&self) -> Vec<Vec<NodeInfo>> {
        match lock(&self.conn).call(&Request::Chains) {
            Ok(Response::Chains(c)) => c,
            _ => Vec::new(),
        }
    }

    fn prune(&mut self) -> u64 {
        match lock(&self.conn).call(&Request::Prune) {
            Ok(Response::Pruned(n)) => n,
            _ => 0,
        }
    }

    /// The partition's metadata lives in the daemon; none here.
    fn metadata_bytes(&self) -> u64 {
        0
    }

    fn shrink(&mut self) {}

    fn take_orphans(&mut self) -> Vec<Slot> {
        match lock(&self.conn).call(&Request::TakeOrphans) {
            Ok(Response::Orphans(s)) => s,
            _ => Vec::new(),
        }
    }

    fn keeps_orphans(&self) -> bool {
        true
    }

    fn return_orphans(&mut self, slots: &[Slot]) {
        if !slots.is_empty() {
            let _ = lock(&self.conn).call(&Request::ReturnOrphans(slots.to_vec()));
        }
    }
}

/// The unstable tree, served by the daemon.
#[derive(Debug, Clone)]
pub struct RemoteUnstableTree {
    conn: SharedConnection,
}

impl RemoteUnstableTree {
    /// The unstable tree of `conn`'s partition.
    pub fn new(conn: &SharedConnection) -> Self {
        RemoteUnstableTree { conn: Arc::clone(conn) }
    }
}

impl UnstableTree for RemoteUnstableTree {
    fn apply(&mut self, ops: &[UnstableOp], out: &mut Vec<UnstableReply>) {
        // Nothing to ask: no round trip.
        if ops.is_empty() {
            out.clear();
            return;
        }
        match lock(&self.conn).call(&Request::Unstable(ops.to_vec())) {
            Ok(Response::Unstable(replies)) if replies.len() == ops.len() => *out = replies,
            _ => {
                out.clear();
                out.extend(ops.iter().map(|_| UnstableReply::Empty));
            }
        }
    }

    fn clear(&mut self) {
        let _ = lock(&self.conn).call(&Request::UnstableClear);
    }

    fn clear_and_shrink(&mut self) {
        self.clear();
    }

    fn len(&self) -> usize {
        match lock(&self.conn).call(&Request::Stats) {
            Ok(Response::Stats { unstable, .. }) => unstable as usize,
            _ => 0,
        }
    }

    /// The tree lives in the daemon; none here.
    fn metadata_bytes(&self) -> u64 {
        0
    }
}

/// The pool's slots, served by the daemon.
#[derive(Debug, Clone)]
pub struct RemotePool {
    conn: SharedConnection,
}

impl RemotePool {
    /// The pool of `conn`'s partition.
    pub fn new(conn: &SharedConnection) -> Self {
        RemotePool { conn: Arc::clone(conn) }
    }
}

impl StablePool for RemotePool {
    fn alloc(&mut self, hints: &[SlotHint], out: &mut Vec<Option<Slot>>) {
        // Nothing to ask: no round trip.
        if hints.is_empty() {
            out.clear();
            return;
        }
        match lock(&self.conn).call(&Request::Alloc(hints.to_vec())) {
            Ok(Response::Slots(s)) if s.len() == hints.len() => *out = s,
            _ => {
                out.clear();
                out.resize(hints.len(), None);
            }
        }
    }

    fn free(&mut self, slots: &[Slot]) {
        if !slots.is_empty() {
            let _ = lock(&self.conn).call(&Request::Free(slots.to_vec()));
        }
    }

    /// Known to the daemon (`samepage status`); not counted here.
    fn in_use(&self) -> u64 {
        0
    }

    fn metadata_bytes(&self) -> u64 {
        0
    }
}
