//! The daemon: partitions of shared state, one per user and domain, served
//! to clients over a unix socket, a thread per client.
//!
//! A client is identified by the peer credentials of its connection
//! (`SO_PEERCRED`: the kernel's word for its user and process, not the
//! client's): processes of different users never share a partition, so they
//! never share a page; inside one user, named domains partition further.
//! When a connection closes (the process exited, was killed, or dropped its
//! engine), everything it held is given back ([`Shared::client_gone`]).

use crate::protocol::{
    encode, read_frame, write_frame, FrameError, Orders, PartitionStatus, ProcessStatus, Request, Response, VERSION,
};
use rustix::fd::{AsFd, OwnedFd};
use samepage_core::shared::{ClientId, Shared};
use samepage_core::Tunables;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const EPROTO: i32 = 71;
const EACCES: i32 = 13;
const ESRCH: i32 = 3;
const EBUSY: i32 = 16;

/// The daemon's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The system-wide tunables at start (`run`, `pages_to_scan`,
    /// `sleep_millisecs`, `max_page_sharing`, ... with the kernel's
    /// meanings; `samepage set` changes them while the daemon runs).
    pub tunables: Tunables,
    /// Slots of each partition's pool.
    pub pool_slots: u64,
}

impl Default for Config {
    /// The kernel's defaults, except `run` = 1: starting the daemon is the
    /// administrator's choice to merge (each process still opts in).
    fn default() -> Self {
        Config {
            tunables: Tunables { run: samepage_core::Run::Merge, ..Tunables::default() },
            pool_slots: samepage_core::scan::DEFAULT_POOL_SLOTS,
        }
    }
}

/// One partition: the shared state of one user's processes in one domain.
#[derive(Debug)]
struct Partition {
    shared: Shared,
    /// The pool: a sparse memfd of `pool_slots` pages every client maps
    /// its merged pages from (named like an engine's own pool, so the
    /// engines' checks of who maps it find it in `/proc/PID/maps`).
    pool: OwnedFd,
    /// Connected clients and their process ids.
    clients: HashMap<ClientId, i32>,
    /// Requests served.
    requests: u64,
    /// Each client's last report.
    reports: HashMap<ClientId, ProcessStatus>,
    /// Merges ordered (`samepage merge --pid`), not yet told to the client.
    merge_orders: HashMap<ClientId, u64>,
    /// What the engines that left counted ([`PartitionStatus::gone`]).
    gone: samepage_core::Counters,
}

/// Partitions by user id and domain.
type Partitions = HashMap<(u32, u32), Arc<Mutex<Partition>>>;

impl Partition {
    /// The last client left: if no process maps the pool any more (a
    /// client's forked child might), every page of it is freed and the
    /// partition starts afresh; otherwise its orphans wait for the next
    /// client.
    fn empty(&mut self) {
        let Ok(st) = rustix::fs::fstat(&self.pool) else { return };
        if crate::procmaps::others_map_pool(&format!(" {} ", st.st_ino), &[]) {
            return;
        }
        let len = st.st_size as u64;
        let punched = rustix::fs::fallocate(
            &self.pool,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            len,
        );
        if punched.is_ok() {
            let max = self.shared.max_page_sharing();
            self.shared = Shared::new(max, len / samepage_core::PAGE_SIZE as u64);
        }
    }
}

/// The daemon's state.
#[derive(Debug)]
pub struct Daemon {
    /// Slots of each partition's pool.
    pool_slots: u64,
    /// The system-wide tunables in force.
    tunables: Mutex<Tunables>,
    /// The daemon's own user: with root, the one who may change tunables.
    owner: u32,
    partitions: Mutex<Partitions>,
    next_client: AtomicU32,
    next_order: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A client thread that panicked left the state as consistent as any
    // request leaves it: serve on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// A daemon with no partition yet.
    pub fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            tunables: Mutex::new(config.tunables),
            pool_slots: config.pool_slots,
            owner: rustix::process::geteuid().as_raw(),
            partitions: Mutex::new(HashMap::new()),
            next_client: AtomicU32::new(1),
            next_order: AtomicU64::new(1),
        })
    }

    /// The system-wide tunables in force.
    pub fn tunables(&self) -> Tunables {
        lock(&self.tunables).clone()
    }

    /// Sets a system-wide tunable for user `uid`, as writing the kernel's
    /// sysfs file does: only root and the daemon's own user may (`EACCES`);
    /// the value is validated as the kernel does (its errno);
    /// `max_page_sharing` changes only while no partition has stable pages
    /// (`EBUSY`, as `max_page_sharing_store`).
    pub fn set(&self, uid: u32, name: &str, value: &str) -> Result<Tunables, (i32, String)> {
        if uid != 0 && uid != self.owner {
            return Err((EACCES, format!("user {uid} may not change {name}: only root and user {} may", self.owner)));
        }
        // Locks in the daemon's one order: the partitions, the tunables, a
        // partition. A partition made meanwhile gets the new value.
        let parts = lock(&self.partitions);
        let mut t = lock(&self.tunables);
        let mut next = t.clone();
        next.set(name, value).map_err(|e| (e.errno(), e.to_string()))?;
        if next.max_page_sharing != t.max_page_sharing {
            let mut held: Vec<MutexGuard<'_, Partition>> = parts.values().map(|p| lock(p)).collect();
            if held.iter().any(|p| p.shared.stats().nodes > 0) {
                let why = format!("max_page_sharing = {value}: stable pages exist (set run = 2 first)");
                return Err((EBUSY, why));
            }
            for p in held.iter_mut() {
                p.shared.set_max_page_sharing(next.max_page_sharing).map_err(|e| (e.errno(), e.to_string()))?;
            }
        }
        *t = next.clone();
        Ok(next)
    }

    /// Orders every engine of process `pid` (of user `uid`, unless root asks)
    /// to merge all its mergeable memory now; returns the orders' ids.
    pub fn order_merge(&self, uid: u32, pid: i32) -> Result<Vec<u64>, (i32, String)> {
        let parts: Partitions = lock(&self.partitions).iter().map(|(k, v)| (*k, Arc::clone(v))).collect();
        let mut ids = Vec::new();
        let mut refused = false;
        for ((owner, _), p) in parts {
            let mut p = lock(&p);
            let clients: Vec<ClientId> = p.clients.iter().filter(|(_, &q)| q == pid).map(|(c, _)| *c).collect();
            if clients.is_empty() {
                continue;
            }
            if uid != 0 && uid != owner {
                refused = true;
                continue;
            }
            for c in clients {
                let id = self.next_order.fetch_add(1, Ordering::Relaxed);
                p.merge_orders.insert(c, id);
                ids.push(id);
            }
        }
        match (ids.is_empty(), refused) {
            (false, _) => Ok(ids),
            (true, true) => Err((EACCES, format!("process {pid} is not user {uid}'s"))),
            (true, false) => Err((ESRCH, format!("process {pid} has no engine connected to this daemon"))),
        }
    }

    /// Client `id`'s share of `pages_to_scan`: the machine-wide rate
    /// shared out in proportion to the pages each client registered (at
    /// least 1 page).
    fn share(&self, id: ClientId, t: &Tunables) -> u32 {
        let parts: Vec<Arc<Mutex<Partition>>> = lock(&self.partitions).values().cloned().collect();
        let (mut mine, mut all) = (0u64, 0u64);
        for p in parts {
            for r in lock(&p).reports.values() {
                all += r.ksm_mergeable;
                if r.client == id {
                    mine = r.ksm_mergeable;
                }
            }
        }
        if all == 0 {
            return t.pages_to_scan;
        }
        let share = (u128::from(t.pages_to_scan) * u128::from(mine)).div_ceil(u128::from(all));
        u32::try_from(share).unwrap_or(u32::MAX).max(1)
    }

    /// Accepts clients on `listener` until it fails, a thread per client.
    pub fn serve(self: &Arc<Self>, listener: &UnixListener) -> std::io::Result<()> {
        for stream in listener.incoming() {
            let stream = stream?;
            let daemon = Arc::clone(self);
            std::thread::Builder::new().name("samepage-client".into()).spawn(move || daemon.client(stream))?;
        }
        Ok(())
    }

    fn partition(&self, uid: u32, domain: u32) -> std::io::Result<Arc<Mutex<Partition>>> {
        let mut parts = lock(&self.partitions);
        if let Some(p) = parts.get(&(uid, domain)) {
            return Ok(Arc::clone(p));
        }
        let pool = rustix::fs::memfd_create("samepage-pool", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&pool, self.pool_slots * samepage_core::PAGE_SIZE as u64)?;
        let p = Arc::new(Mutex::new(Partition {
            shared: Shared::new(lock(&self.tunables).max_page_sharing, self.pool_slots),
            pool,
            clients: HashMap::new(),
            requests: 0,
            reports: HashMap::new(),
            merge_orders: HashMap::new(),
            gone: samepage_core::Counters::default(),
        }));
        parts.insert((uid, domain), Arc::clone(&p));
        Ok(p)
    }

    /// Serves one connection until it closes; then the client is gone.
    fn client(&self, mut stream: UnixStream) {
        let Ok(cred) = rustix::net::sockopt::socket_peercred(&stream) else { return };
        let (uid, pid) = (cred.uid.as_raw(), cred.pid.as_raw_nonzero().get());
        let domain = match read_frame::<Request>(&mut stream) {
            Ok(Request::Hello { version, domain }) if version == VERSION => domain,
            Ok(Request::Status) => {
                let _ = write_frame(&mut stream, &Response::Status(self.status()));
                return;
            }
            Ok(req @ (Request::Set { .. } | Request::Tunables | Request::MergePid(_))) => {
                let _ = write_frame(&mut stream, &self.admin(uid, req));
                return;
            }
            Ok(other) => {
                let message = format!("the first request must be Hello with version {VERSION}, not {other:?}");
                let _ = write_frame(&mut stream, &Response::Error { errno: EPROTO, message });
                return;
            }
            Err(_) => return,
        };
        let part = match self.partition(uid, domain) {
            Ok(p) => p,
            Err(e) => {
                let message = format!("cannot make the partition's pool: {e}");
                let errno = e.raw_os_error().unwrap_or(EPROTO);
                let _ = write_frame(&mut stream, &Response::Error { errno, message });
                return;
            }
        };
        let id = ClientId(self.next_client.fetch_add(1, Ordering::Relaxed));
        let sent = {
            let mut p = lock(&part);
            p.clients.insert(id, pid);
            let hello = Response::Hello {
                client: id,
                max_page_sharing: p.shared.max_page_sharing(),
                pool_slots: self.pool_slots,
            };
            send_with_fd(&stream, &hello, p.pool.as_fd())
        };
        if sent.is_ok() {
            loop {
                let req = match read_frame::<Request>(&mut stream) {
                    Ok(r) => r,
                    Err(FrameError::Io(_)) => break,
                    Err(e) => {
                        let message = format!("{e}");
                        let _ = write_frame(&mut stream, &Response::Error { errno: EPROTO, message });
                        break;
                    }
                };
                let resp = match req {
                    Request::Status => Response::Status(self.status()),
                    Request::Report(r) => {
                        let (merge_now, pool_users) = {
                            let mut p = lock(&part);
                            // The daemon's word for who the client is, not the client's.
                            p.reports.insert(id, ProcessStatus { client: id, pid, ..r });
                            let users = p.clients.values().filter_map(|&q| u32::try_from(q).ok()).collect();
                            (p.merge_orders.remove(&id), users)
                        };
                        let tunables = self.tunables();
                        let pages_to_scan = self.share(id, &tunables);
                        Response::Orders(Orders { tunables, pages_to_scan, merge_now, pool_users })
                    }
                    req @ (Request::Set { .. } | Request::Tunables | Request::MergePid(_)) => self.admin(uid, req),
                    req => {
                        let mut p = lock(&part);
                        p.requests += 1;
                        handle(&mut p.shared, id, req)
                    }
                };
                if write_frame(&mut stream, &resp).is_err() {
                    break;
                }
            }
        }
        let mut p = lock(&part);
        p.shared.client_gone(id);
        p.clients.remove(&id);
        if let Some(r) = p.reports.remove(&id) {
            crate::view::retire(&mut p.gone, &r);
        }
        p.merge_orders.remove(&id);
        if p.clients.is_empty() {
            p.empty();
        }
    }

    /// A request about the whole daemon from user `uid`.
    fn admin(&self, uid: u32, req: Request) -> Response {
        let refuse = |(errno, message): (i32, String)| Response::Error { errno, message };
        match req {
            Request::Set { name, value } => self.set(uid, &name, &value).map_or_else(refuse, Response::Tunables),
            Request::Tunables => Response::Tunables(self.tunables()),
            Request::MergePid(pid) => self.order_merge(uid, pid).map_or_else(refuse, Response::MergeOrdered),
            other => Response::Error { errno: EPROTO, message: format!("not a daemon-wide request: {other:?}") },
        }
    }

    /// Every partition and its clients.
    pub fn status(&self) -> Vec<PartitionStatus> {
        let parts: Partitions = lock(&self.partitions).iter().map(|(k, v)| (*k, Arc::clone(v))).collect();
        let mut out: Vec<PartitionStatus> = parts
            .into_iter()
            .map(|((uid, domain), p)| {
                let mut p = lock(&p);
                if p.clients.is_empty() && (p.shared.orphans() > 0 || p.shared.pool_in_use() > 0) {
                    // Its last client's memory may have been unmapped only
                    // after its connection closed: try again.
                    p.empty();
                }
                let mut clients: Vec<(ClientId, i32)> = p.clients.iter().map(|(c, pid)| (*c, *pid)).collect();
                clients.sort();
                PartitionStatus {
                    uid,
                    domain,
                    stable: p.shared.stats(),
                    slots_in_use: p.shared.pool_in_use(),
                    orphans: p.shared.orphans() as u64,
                    pool_bytes: rustix::fs::fstat(&p.pool).map_or(0, |st| st.st_blocks as u64 * 512),
                    requests: p.requests,
                    processes: {
                        let mut r: Vec<ProcessStatus> = p.reports.values().cloned().collect();
                        r.sort_by_key(|r| r.client);
                        r
                    },
                    unshared: p.shared.unstable_total() as u64,
                    metadata_bytes: p.shared.metadata_bytes(),
                    clients,
                    gone: p.gone.clone(),
                }
            })
            .collect();
        out.sort_by_key(|p| (p.uid, p.domain));
        out
    }
}

/// One request of client `id` on its partition's state.
fn handle(shared: &mut Shared, id: ClientId, req: Request) -> Response {
    match req {
        Request::Stable(ops) => {
            let mut out = Vec::with_capacity(ops.len());
            shared.stable_apply(id, &ops, &mut out);
            Response::Stable(out)
        }
        Request::Unstable(ops) => {
            let mut out = Vec::with_capacity(ops.len());
            shared.unstable_apply(id, &ops, &mut out);
            Response::Unstable(out)
        }
        Request::UnstableClear => {
            shared.unstable_clear(id);
            Response::Done
        }
        Request::Alloc(hints) => {
            let mut out = Vec::with_capacity(hints.len());
            shared.pool_alloc(&hints, &mut out);
            Response::Slots(out)
        }
        Request::Free(slots) => {
            shared.pool_free(&slots);
            Response::Done
        }
        Request::Stats => Response::Stats {
            partition: shared.stats(),
            held: shared.held_stats(id),
            max_page_sharing: shared.max_page_sharing(),
            metadata_bytes: shared.metadata_bytes(),
            unstable: shared.unstable_len(id) as u64,
        },
        Request::Nodes => {
            let mut out = Vec::new();
            shared.nodes(id, &mut out);
            Response::Nodes(out)
        }
        Request::Chains => Response::Chains(shared.chains()),
        Request::Prune => Response::Pruned(shared.prune()),
        Request::TakeOrphans => Response::Orphans(shared.take_orphans()),
        Request::ReturnOrphans(slots) => {
            shared.return_orphans(&slots);
            Response::Done
        }
        Request::Hello { .. }
        | Request::Status
        | Request::Report(_)
        | Request::Set { .. }
        | Request::Tunables
        | Request::MergePid(_) => Response::Error { errno: EPROTO, message: "Hello is the first request only".into() },
    }
}

/// Sends one frame with a file descriptor (`SCM_RIGHTS`) riding on it.
fn send_with_fd(stream: &UnixStream, value: &Response, fd: rustix::fd::BorrowedFd<'_>) -> Result<(), FrameError> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let frame = encode(value)?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(FrameError::Io(std::io::Error::other("no room for SCM_RIGHTS")));
    }
    let mut sent = rustix::net::sendmsg(stream, &[std::io::IoSlice::new(&frame)], &mut control, SendFlags::NOSIGNAL)
        .map_err(std::io::Error::from)?;
    // The descriptor went with the first byte; the rest is plain data.
    while sent < frame.len() {
        sent += rustix::net::send(stream, &frame[sent..], SendFlags::NOSIGNAL).map_err(std::io::Error::from)?;
    }
    Ok(())
}
