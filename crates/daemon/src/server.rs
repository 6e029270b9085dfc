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
    encode, read_frame, write_frame, FrameError, PartitionStatus, ProcessStatus, Request, Response, VERSION,
};
use rustix::fd::{AsFd, OwnedFd};
use samepage_core::shared::{ClientId, Shared};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const EPROTO: i32 = 71;

/// The daemon's settings.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// `max_page_sharing` of new partitions.
    pub max_page_sharing: u32,
    /// Slots of each partition's pool.
    pub pool_slots: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_page_sharing: samepage_core::Tunables::default().max_page_sharing,
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
}

/// Partitions by user id and domain.
type Partitions = HashMap<(u32, u32), Arc<Mutex<Partition>>>;

impl Partition {
    /// The last client left: if no process maps the pool any more (a
    /// client's forked child might), every page of it is freed and the
    /// partition starts afresh; otherwise its orphans wait for the next
    /// client.
    fn empty(&mut self) {
        let ino = rustix::fs::fstat(&self.pool).map_or(0, |st| st.st_ino);
        if ino == 0 || crate::procmaps::others_map_pool(&format!(" {ino} ")) {
            return;
        }
        let len = rustix::fs::fstat(&self.pool).map_or(0, |st| st.st_size as u64);
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
    config: Config,
    partitions: Mutex<Partitions>,
    next_client: AtomicU32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A client thread that panicked left the state as consistent as any
    // request leaves it: serve on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// A daemon with no partition yet.
    pub fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon { config, partitions: Mutex::new(HashMap::new()), next_client: AtomicU32::new(1) })
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
        let c = self.config;
        if let Some(p) = parts.get(&(uid, domain)) {
            return Ok(Arc::clone(p));
        }
        let pool = rustix::fs::memfd_create("samepage-pool", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&pool, c.pool_slots * samepage_core::PAGE_SIZE as u64)?;
        let p = Arc::new(Mutex::new(Partition {
            shared: Shared::new(c.max_page_sharing, c.pool_slots),
            pool,
            clients: HashMap::new(),
            requests: 0,
            reports: HashMap::new(),
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
                pool_slots: self.config.pool_slots,
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
                        let mut p = lock(&part);
                        // The daemon's word for who the client is, not the client's.
                        p.reports.insert(id, ProcessStatus { client: id, pid, ..r });
                        Response::Done
                    }
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
        p.reports.remove(&id);
        if p.clients.is_empty() {
            p.empty();
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
                    clients,
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
        Request::SetMaxPageSharing(max) => match shared.set_max_page_sharing(max) {
            Ok(()) => Response::Done,
            Err(e) => Response::Error { errno: e.errno(), message: e.to_string() },
        },
        Request::Stats => Response::Stats {
            partition: shared.stats(),
            held: shared.held_stats(id),
            max_page_sharing: shared.max_page_sharing(),
            metadata_bytes: shared.stable_metadata_bytes()
                + shared.unstable_metadata_bytes()
                + shared.pool_metadata_bytes(),
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
        Request::Hello { .. } | Request::Status | Request::Report(_) => {
            Response::Error { errno: EPROTO, message: "Hello is the first request only".into() }
        }
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
