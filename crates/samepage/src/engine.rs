//! The engine: the scanner on its own thread, driven through a small API.

use crate::error::Error;
use crate::region::Region;
use crate::sys::addr::PageAddr;
use crate::sys::attrs::Exclusion;
use crate::sys::mapping::AnonMapping;
use crate::sys::mem;
use crate::sys::space::{LinuxPageSpace, SpaceStats};
use crate::sys::uffd::UffdMode;
use samepage_core::pool::{LocalPool, StablePool};
use samepage_core::scan::DEFAULT_POOL_SLOTS;
use samepage_core::stable::{LocalStableTree, StableTree};
use samepage_core::unstable::{LocalUnstableTree, UnstableTree};
use samepage_core::Discard;
use samepage_core::{Counters, Domain, Ksm, RegionCounters, RegionId, Run, Tunables, PAGE_SIZE};
use samepage_daemon::client::{Connection, RemotePool, RemoteStableTree, RemoteUnstableTree};
use samepage_daemon::protocol::{MergeOutcome, Orders};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Region ids an engine hands out in its life (never reused): the core packs
/// a page as a 24-bit region id and a 40-bit index ([`RegionId::MAX`]).
pub const MAX_REGIONS: u32 = RegionId::MAX + 1;

/// Attributes [`Engine::advise`] gives registered memory, with the kernel's
/// `madvise` meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTFORK`: a forked child does not get the memory.
    DontFork,
    /// `MADV_DOFORK`: undoes `DontFork`.
    DoFork,
    /// `MADV_DONTDUMP`: left out of core dumps.
    DontDump,
    /// `MADV_DODUMP`: undoes `DontDump`.
    DoDump,
    /// `MADV_HUGEPAGE`.
    HugePage,
    /// `MADV_NOHUGEPAGE`.
    NoHugePage,
    /// `MADV_WIPEONFORK`: a forked child reads zeros there. Merged memory
    /// cannot keep it: the engine unmerges the range and stays away.
    WipeOnFork,
    /// `MADV_KEEPONFORK`: undoes `WipeOnFork` (the engine merges there again).
    KeepOnFork,
}

impl Advice {
    fn hint(self) -> mem::Hint {
        match self {
            Advice::DontFork => mem::Hint::DontFork,
            Advice::DoFork => mem::Hint::DoFork,
            Advice::DontDump => mem::Hint::DontDump,
            Advice::DoDump => mem::Hint::DoDump,
            Advice::HugePage => mem::Hint::HugePage,
            Advice::NoHugePage => mem::Hint::NoHugePage,
            Advice::WipeOnFork => mem::Hint::WipeOnFork,
            Advice::KeepOnFork => mem::Hint::KeepOnFork,
        }
    }
}

/// What [`Engine::merge_now`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Pages merged.
    pub pages: u64,
    /// Bytes merging saved.
    pub saved_bytes: u64,
}

/// What the engine runs with, fixed at start.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineInfo {
    /// The userfaultfd's kind: [`UffdMode::UserModeOnly`] means a syscall
    /// writing into a page during its merge window can fail with EFAULT.
    pub uffd_mode: UffdMode,
    /// Whether `PAGEMAP_SCAN` is used (else `/proc/self/pagemap` reads).
    pub pagemap_scan: bool,
    /// The number of mappings the engine stays under (its share of
    /// `vm.max_map_count` headroom), as computed at start.
    pub vma_limit: u64,
    /// Whether writes to merged pages are served by the engine's
    /// copy-on-write breaker (full-mode userfaultfd), so a written page can
    /// merge again; without it a written page stays a private copy inside
    /// the pool mapping and is never merged again (`pages_pool_copies`).
    pub breaks_cow: bool,
    /// The inode of the pool's memfd at start (how `/proc/PID/maps` shows
    /// merged pages); a new daemon after a reconnection gives a new pool.
    pub pool_inode: u64,
    /// The daemon's socket when the engine merges with other processes
    /// through it ([`Engine::connect`]); `None` for an engine of its own.
    pub daemon: Option<PathBuf>,
}

/// How often an engine connected to a daemon reports its figures (and so
/// how soon it follows the daemon's orders: new tunables, a merge now).
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// How this process measures the memory its engines take ([`set_own_memory_probe`]).
static OWN_MEMORY: std::sync::OnceLock<fn() -> u64> = std::sync::OnceLock::new();

/// Sets how this process measures the memory its engines take (bytes), which
/// each engine reports to the daemon as the process's `memory_bytes`: what
/// merging costs the process, beside what it saves. The preload library,
/// whose engine allocates from a heap of its own, counts that heap's
/// resident pages. Without a probe an engine reports its metadata (rmap
/// items and pool-slot tables), which lives among the program's own
/// allocations. The first probe set stays.
pub fn set_own_memory_probe(probe: fn() -> u64) {
    let _ = OWN_MEMORY.set(probe);
}

/// How often an engine whose daemon went away tries its socket again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The stable tree an engine uses: its own, or a daemon's.
type Stable = Box<dyn StableTree + Send>;
/// The unstable tree an engine uses.
type Unstable = Box<dyn UnstableTree + Send>;
/// The pool slots an engine uses.
type Slots = Box<dyn StablePool + Send>;
/// An engine's scanner.
type EngineKsm = Ksm<Stable, Unstable, Slots>;

pub(crate) struct State {
    // Fields drop in order: the page space (and the pool view) goes before
    // the scanner's trees, whose connection to a daemon closing tells the
    // daemon this process no longer maps its pool.
    space: LinuxPageSpace,
    ksm: EngineKsm,
    regions: BTreeMap<RegionId, (usize, usize)>,
    /// Per region, the page ranges the engine stays away from, and why.
    excluded: BTreeMap<RegionId, Vec<(Range<u64>, Exclusion)>>,
    next_id: u32,
    stop: bool,
    /// The daemon this engine is a client of.
    daemon: Option<DaemonLink>,
}

/// An engine's link to the daemon it is a client of: it reports its
/// figures a few times a second and gets the daemon's orders back.
struct DaemonLink {
    conn: samepage_daemon::client::SharedConnection,
    /// When it last reported.
    last: std::cell::Cell<Instant>,
    /// Orders received, for the scanner's next turn.
    orders: std::cell::RefCell<Option<Orders>>,
    /// The last orders applied: the system-wide tunables and this
    /// process's share of `pages_to_scan`.
    applied: Orders,
    /// The `run` the program set: whether this process merges (the other
    /// tunables are the daemon's, system-wide).
    own_run: Run,
    /// The outcome of the last merge the daemon ordered, to report.
    merged_now: std::cell::Cell<Option<MergeOutcome>>,
    /// Where the daemon listens, and this engine's trust domain there: to
    /// connect again when the daemon went away.
    socket: PathBuf,
    domain: Domain,
    /// When to try the socket again while the connection is broken.
    next_try: Instant,
    /// Daemons this engine connected to again after losing one.
    reconnects: u64,
}

/// How an engine's link to its daemon stands ([`Engine::daemon_link`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonLinkStatus {
    /// Whether the daemon answers. While it does not, the engine's merged
    /// pages stay as they are and nothing new merges; it tries the socket
    /// again every second.
    pub connected: bool,
    /// Times the engine found a daemon again after losing one: each time it
    /// unmerged everything (the old daemon's pool is not the new one's) and
    /// started over with the new daemon.
    pub reconnects: u64,
}

/// A partition of the daemon at a socket, joined: the connection, the
/// pool memfd and its slots, the first orders (the daemon's tunables).
struct Joined {
    conn: samepage_daemon::client::SharedConnection,
    pool: (rustix::fd::OwnedFd, u64),
    orders: Orders,
}

impl Joined {
    fn join(socket: &Path, domain: Domain) -> Result<Joined, Error> {
        let conn = Connection::connect(socket, domain.0)?;
        let (pool, orders) = {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            let pool = c
                .take_pool()
                .ok_or_else(|| samepage_daemon::client::ClientError::Unexpected("no pool memfd".into()))?;
            (pool, c.report(Default::default())?)
        };
        Ok(Joined { conn, pool, orders })
    }

    /// The scanner's parts: the partition's trees and pool slots.
    fn parts(&self) -> (Stable, Unstable, Slots) {
        (
            Box::new(RemoteStableTree::new(&self.conn)),
            Box::new(RemoteUnstableTree::new(&self.conn)),
            Box::new(RemotePool::new(&self.conn)),
        )
    }
}

impl DaemonLink {
    /// The tunables in force: the daemon's, with this process's share of
    /// `pages_to_scan`, and `run` the program's while the daemon's is 1
    /// (the daemon's 0 stops and 2 unmerges every process, as ksmd's).
    /// Under the scan-time advisor `pages_to_scan` is the advisor's, as
    /// `now` (the tunables in force) has it.
    fn effective(&self, now: &Tunables) -> Tunables {
        let mut t = self.applied.tunables.clone();
        if t.advisor_mode == samepage_core::AdvisorMode::None {
            t.pages_to_scan = self.applied.pages_to_scan;
        } else if t.advisor_mode == now.advisor_mode {
            t.pages_to_scan = now.pages_to_scan;
        }
        if t.run == Run::Merge {
            t.run = self.own_run;
        }
        t
    }
}

impl State {
    /// Sets the tunables in force; `run = 2` unmerges every page.
    fn apply_tunables(&mut self, t: Tunables) -> Result<(), Error> {
        let was = self.ksm.tunables().run;
        self.ksm.set_tunables(t.clone())?;
        if t.run == Run::Unmerge && was != Run::Unmerge {
            let State { ksm, space, .. } = self;
            ksm.unmerge_all(space).map_err(Error::Unmerge)?;
        }
        Ok(())
    }

    /// The daemon went away (an exchange with it failed): every
    /// [`RECONNECT_EVERY`], try its socket again. When a daemon answers,
    /// every page is unmerged (the old daemon's pool is not the new one's,
    /// and its stable tree is gone) and the engine starts over with the new
    /// daemon's partition: its trees, its pool, its tunables. Until then
    /// merged pages stay as they are, byte-exact, and nothing new merges.
    /// Returns whether the engine connected again.
    fn reconnect_if_due(&mut self) -> bool {
        let Some(d) = self.daemon.as_mut() else { return false };
        if !d.conn.lock().unwrap_or_else(|e| e.into_inner()).is_broken() || Instant::now() < d.next_try {
            return false;
        }
        d.next_try = Instant::now() + RECONNECT_EVERY;
        let Ok(joined) = Joined::join(&d.socket, d.domain) else { return false };
        // Back to private memory, every page: if that fails (too little
        // memory; `unmerge_all` then leaves `run` at 0), the new connection
        // closes and a later try starts again.
        let tunables = self.ksm.tunables().clone();
        let State { ksm, space, .. } = self;
        if ksm.unmerge_all(space).is_err() {
            let _ = ksm.set_tunables(tunables);
            return false;
        }
        let parts = joined.parts();
        let Joined { conn, pool: (fd, slots), orders } = joined;
        if space.replace_shared_pool(fd, slots).is_err() {
            return false;
        }
        if ksm.replace_parts(parts.0, parts.1, parts.2).is_err() {
            // Cannot be (nothing is merged after unmerge_all), and the pool
            // is the new one already: merging stops rather than risk it.
            let mut t = ksm.tunables().clone();
            t.run = Run::Stop;
            let _ = ksm.set_tunables(t);
            return false;
        }
        space.set_pool_users(orders.pool_users.clone());
        let d = self.daemon.as_mut().expect("checked above");
        d.conn = conn;
        d.reconnects += 1;
        d.orders.replace(Some(orders));
        d.last.set(Instant::now());
        true
    }

    /// Applies the daemon's latest orders (new tunables, a merge of
    /// everything now).
    fn follow_orders(&mut self) {
        let Some(orders) = self.daemon.as_ref().and_then(|d| d.orders.borrow_mut().take()) else { return };
        let merge_now = orders.merge_now;
        self.space.set_pool_users(orders.pool_users.clone());
        let want = {
            let d = self.daemon.as_mut().expect("orders came from it");
            d.applied = orders;
            d.effective(self.ksm.tunables())
        };
        if want != *self.ksm.tunables() {
            // EBUSY for max_page_sharing cannot come: the daemon changes it
            // only while no stable page exists.
            let _ = self.apply_tunables(want);
        }
        if let Some(id) = merge_now {
            let all: Vec<(RegionId, u64)> =
                self.regions.iter().map(|(id, (s, e))| (*id, ((e - s) / PAGE_SIZE) as u64)).collect();
            let m = self
                .merge_measured(|ksm, space| all.iter().map(|&(r, n)| ksm.merge_range(space, r, 0..n).merged).sum());
            if let Some(d) = &self.daemon {
                d.merged_now.set(Some(MergeOutcome { id, pages: m.pages, saved_bytes: m.saved_bytes, errno: None }));
            }
        }
    }

    /// Runs `merge` (which returns the pages it merged) and measures the
    /// bytes it saved: `pages_sharing + ksm_zero_pages` grown, times the
    /// page size.
    fn merge_measured(&mut self, merge: impl FnOnce(&mut EngineKsm, &mut LinuxPageSpace) -> u64) -> Merged {
        let before = self.ksm.counters().pages_saved();
        let State { ksm, space, .. } = self;
        let pages = merge(ksm, space);
        Merged { pages, saved_bytes: self.ksm.counters().pages_saved().saturating_sub(before) * PAGE_SIZE as u64 }
    }

    /// Reads region `id`'s attributes again; unmerges what became excluded.
    fn refresh(&mut self, id: RegionId) -> Result<(), Error> {
        let excluded = self.space.refresh_attributes(id)?;
        let State { ksm, space, .. } = self;
        for (pages, _) in &excluded {
            ksm.unmerge_range(space, id, pages.clone()).map_err(Error::Unmerge)?;
        }
        if excluded.is_empty() {
            self.excluded.remove(&id);
        } else {
            self.excluded.insert(id, excluded);
        }
        Ok(())
    }

    /// The region whose live pages hold all of `[addr, addr + len)`, and
    /// that range as page indices.
    fn pages_of(&self, addr: usize, len: usize) -> Result<(RegionId, Range<u64>), Error> {
        if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned { addr, len });
        }
        let end = addr.checked_add(len).ok_or(Error::Unaligned { addr, len })?;
        // One region's live pages, and no other's.
        let mut owners = self.regions.iter().filter(|(id, _)| self.live_overlap(**id, addr, end));
        match (owners.next(), owners.next()) {
            (Some((id, (s, e))), None) if *s <= addr && end <= *e => {
                let first = ((addr - s) / PAGE_SIZE) as u64;
                Ok((*id, first..first + (len / PAGE_SIZE) as u64))
            }
            _ => Err(Error::NotRegistered { addr, end }),
        }
    }

    /// Whether `addr..end` meets pages of region `id` that were not released.
    fn live_overlap(&self, id: RegionId, addr: usize, end: usize) -> bool {
        let Some(&(s, e)) = self.regions.get(&id) else { return false };
        let (from, to) = (s.max(addr), e.min(end));
        if from >= to {
            return false;
        }
        let (first, last) = (((from - s) / PAGE_SIZE) as u64, (to - s).div_ceil(PAGE_SIZE) as u64);
        let released = self.ksm.released_ranges(id).unwrap_or(&[]);
        // Released ranges are merged, so one of them covers it or none does.
        !released.iter().any(|r| r.start <= first && last <= r.end)
    }
}

#[derive(Default)]
struct Snapshot {
    counters: Counters,
    regions: HashMap<RegionId, RegionCounters>,
    stats: SpaceStats,
    link: Option<DaemonLinkStatus>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    /// API callers waiting for the state lock: the engine thread yields to them.
    waiters: AtomicUsize,
    snapshot: Mutex<Snapshot>,
    failed: Mutex<Option<String>>,
    cpu_ns: AtomicU64,
    batches: AtomicU64,
    started: Instant,
    /// The pool memfd's inode now (a reconnection to a new daemon changes it).
    pool_inode: AtomicU64,
}

/// A running samepage engine.
///
/// Dropping it stops the scanner thread. Merged pages stay merged and
/// correct: they are ordinary copy-on-write mappings of the pool.
pub struct Engine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    info: EngineInfo,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

impl Engine {
    /// Starts an engine with `tunables` (validated as the kernel does), a
    /// VMA budget of half the `vm.max_map_count` headroom.
    pub fn new(tunables: Tunables) -> Result<Engine, Error> {
        Self::with_vma_budget(tunables, 0.5)
    }

    /// Starts an engine that may use `share` (0 to 1) of the mappings the
    /// process has left under `vm.max_map_count` when it starts.
    pub fn with_vma_budget(tunables: Tunables, share: f64) -> Result<Engine, Error> {
        tunables.validate()?;
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::Tunable(samepage_core::TunableError::OutOfRange {
                name: "vma_budget_share",
                value: share.to_string(),
                allowed: "0.0 to 1.0",
            }));
        }
        let space = LinuxPageSpace::new(DEFAULT_POOL_SLOTS, share)?;
        let parts: (Stable, Unstable, Slots) = (
            Box::new(LocalStableTree::new(tunables.max_page_sharing)),
            Box::new(LocalUnstableTree::new()),
            Box::new(LocalPool::new(DEFAULT_POOL_SLOTS)),
        );
        Self::start(tunables, space, parts, None, None)
    }

    /// Starts an engine that merges with other processes through the daemon
    /// at `socket` (`samepage daemon`): its stable tree, unstable tree and
    /// pool are the daemon's partition for this process's user (and trust
    /// `domain`), so identical pages of different processes share one pool
    /// page. `max_page_sharing` is the daemon's (system-wide, as the
    /// kernel's); the other tunables are this engine's.
    ///
    /// Refused with [`Error::Daemon`] when no daemon answers there (the
    /// errno says why: `ENOENT`, `ECONNREFUSED`); use [`Engine::new`] for an
    /// engine of its own.
    pub fn connect(socket: &Path, domain: Domain, mut tunables: Tunables) -> Result<Engine, Error> {
        let joined = Joined::join(socket, domain)?;
        tunables.max_page_sharing = joined.conn.lock().unwrap_or_else(|e| e.into_inner()).max_page_sharing();
        tunables.validate()?;
        let parts = joined.parts();
        // The daemon's tunables are in force from the start.
        let Joined { conn, pool: (fd, slots), orders } = joined;
        let mut space = LinuxPageSpace::with_shared_pool(fd, slots, 0.5)?;
        space.set_pool_users(orders.pool_users.clone());
        let link = DaemonLink {
            conn,
            last: std::cell::Cell::new(Instant::now()),
            orders: std::cell::RefCell::new(None),
            own_run: tunables.run,
            merged_now: std::cell::Cell::new(None),
            applied: orders,
            socket: socket.to_path_buf(),
            domain,
            next_try: Instant::now(),
            reconnects: 0,
        };
        Self::start(link.effective(&tunables), space, parts, Some(socket.to_path_buf()), Some(link))
    }

    /// [`Engine::connect`] at the default socket
    /// (`/run/samepage/samepage.sock` as root, `$XDG_RUNTIME_DIR/samepage.sock`
    /// otherwise), in the default domain.
    pub fn connect_default(tunables: Tunables) -> Result<Engine, Error> {
        Self::connect(&samepage_daemon::default_socket(), Domain::default(), tunables)
    }

    fn start(
        tunables: Tunables,
        space: LinuxPageSpace,
        (stable, unstable, pool): (Stable, Unstable, Slots),
        daemon: Option<PathBuf>,
        daemon_link: Option<DaemonLink>,
    ) -> Result<Engine, Error> {
        let info = EngineInfo {
            uffd_mode: space.uffd_mode(),
            pagemap_scan: space.has_pagemap_scan(),
            vma_limit: space.vma_limit(),
            breaks_cow: space.breaks_cow(),
            pool_inode: space.pool_inode(),
            daemon,
        };
        let mut ksm = Ksm::with_parts(tunables.clone(), stable, unstable, pool)?;
        if tunables.run == Run::Unmerge {
            ksm.set_tunables(tunables)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ksm,
                space,
                regions: BTreeMap::new(),
                excluded: BTreeMap::new(),
                next_id: 0,
                stop: false,
                daemon: daemon_link,
            }),
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            snapshot: Mutex::new(Snapshot::default()),
            failed: Mutex::new(None),
            cpu_ns: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            started: Instant::now(),
            pool_inode: AtomicU64::new(info.pool_inode),
        });
        let s = shared.clone();
        let thread = crate::sys::mem::spawn_engine_thread("samepage-ksmd", move || scanner(s))
            .map_err(|e| Error::EngineFailed(format!("cannot spawn the scanner thread: {e}")))?;
        Ok(Engine { shared, thread: Some(thread), info })
    }

    /// How the engine runs (userfaultfd kind, pagemap access, VMA limit).
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// The tunables in force.
    pub fn tunables(&self) -> Result<Tunables, Error> {
        Ok(self.shared.lock()?.ksm.tunables().clone())
    }

    /// Changes the tunables. Validated as the kernel does: `max_page_sharing`
    /// cannot change while stable pages exist (EBUSY; set `run = 2` first).
    /// `run = 2` unmerges every page before returning; if that fails (too
    /// little memory), nothing is lost and `run` is left at 0, as the kernel
    /// leaves it.
    ///
    /// An engine connected to a daemon takes only `run` from `t` (whether
    /// this process merges, as its `MADV_MERGEABLE` would say); the other
    /// tunables are the daemon's, system-wide (`samepage set` changes them).
    pub fn set_tunables(&self, t: Tunables) -> Result<(), Error> {
        t.validate()?;
        let mut st = self.shared.lock()?;
        let State { daemon, ksm, .. } = &mut *st;
        let t = match daemon {
            Some(d) => {
                d.own_run = t.run;
                d.effective(ksm.tunables())
            }
            None => t,
        };
        let r = st.apply_tunables(t);
        self.shared.publish(&st);
        r?;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Sets `run` alone (0 stop, 1 merge, 2 unmerge everything).
    pub fn set_run(&self, run: Run) -> Result<(), Error> {
        let mut t = self.tunables()?;
        t.run = run;
        self.set_tunables(t)
    }

    /// Allocates `len` bytes (rounded up to pages) of zeroed anonymous
    /// memory, registered as mergeable. Unregistered and unmapped on drop.
    pub fn alloc_region(&self, len: usize) -> Result<Region, Error> {
        self.alloc_region_in(len, Domain::default())
    }

    /// As [`Engine::alloc_region`], in a trust domain: its pages never merge
    /// with pages of another domain (see the README on the timing side channel).
    pub fn alloc_region_in(&self, len: usize, domain: Domain) -> Result<Region, Error> {
        let mapping = AnonMapping::new(len)?;
        let id = self.add_region(mapping.as_ptr() as usize, mapping.len(), domain)?;
        Ok(Region::new(mapping, id, self.shared.clone()))
    }

    /// Registers existing memory as mergeable (the `MADV_MERGEABLE` equivalent).
    ///
    /// Refused with a typed error: an empty or unaligned range, one that is
    /// not entirely private anonymous read-write memory, or one that overlaps
    /// a registered region.
    ///
    /// # Safety
    /// The range must stay mapped, and the program must not `munmap`,
    /// `mremap` or `mprotect` any part of it, until [`Engine::unregister`]
    /// (or, for that part, [`Engine::unregister_range`]) returns. The engine
    /// replaces pages of the range by mappings of its pool, so `MADV_DONTNEED`
    /// on a merged page brings back its merged content instead of zeros.
    #[allow(unsafe_code, reason = "declares the contract; the unsafe operations live in `sys`")]
    pub unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<RegionId, Error> {
        self.add_region(addr as usize, len, Domain::default())
    }

    /// As [`Engine::register`], in a trust domain.
    ///
    /// # Safety
    /// As [`Engine::register`].
    #[allow(unsafe_code, reason = "declares the contract; the unsafe operations live in `sys`")]
    pub unsafe fn register_in(&self, addr: *mut u8, len: usize, domain: Domain) -> Result<RegionId, Error> {
        self.add_region(addr as usize, len, domain)
    }

    fn add_region(&self, addr: usize, len: usize, domain: Domain) -> Result<RegionId, Error> {
        if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned { addr, len });
        }
        let end = addr.checked_add(len).ok_or(Error::Unaligned { addr, len })?;
        let base = PageAddr::new(addr).ok_or(Error::Unaligned { addr, len })?;
        // Read from /proc before taking the lock: slow with many mappings.
        // The engine maps nothing into memory it does not have registered,
        // and memory it has is refused below.
        let pool_inode = self.shared.pool_inode.load(Ordering::Relaxed);
        check_anonymous(addr, end, pool_inode)?;
        let prepared = LinuxPageSpace::prepare_region(base, (len / PAGE_SIZE) as u64, pool_inode)?;
        let mut st = self.shared.lock()?;
        // Released parts of a region are the program's again: they may be registered anew.
        if let Some((id, (s, e))) = st.regions.iter().find(|(id, _)| st.live_overlap(**id, addr, end)) {
            return Err(Error::Overlap { addr, end, region: *id, rstart: *s, rend: *e });
        }
        if st.next_id >= MAX_REGIONS {
            return Err(Error::RegionIdsExhausted);
        }
        let id = RegionId(st.next_id);
        st.next_id += 1;
        let excluded = st.space.add_region(id, prepared);
        st.ksm.add_region_in(id, (len / PAGE_SIZE) as u64, domain);
        st.regions.insert(id, (addr, end));
        if !excluded.is_empty() {
            st.excluded.insert(id, excluded);
        }
        self.shared.publish(&st);
        drop(st);
        self.shared.cond.notify_all();
        Ok(id)
    }

    /// Unregisters a region (`MADV_UNMERGEABLE`): every merged page, zero
    /// pages included, becomes private again with its content intact. Fails
    /// (nothing lost, still registered) when unsharing needs memory that is
    /// not there, like the kernel's EAGAIN/ENOMEM.
    pub fn unregister(&self, id: RegionId) -> Result<(), Error> {
        self.shared.unregister(id)
    }

    /// Takes part of a registered region back, so the program may `munmap`,
    /// `mremap` or `mprotect` it (`MADV_UNMERGEABLE` on the part, then forget
    /// it): its merged pages become private with their content intact, the
    /// engine's metadata for it goes, and the engine never reads, protects or
    /// maps anything there again. The rest of the region stays registered;
    /// the part may be registered again later, as a new region.
    ///
    /// The kernel's KSM needs no such call, because it learns of `munmap` and
    /// `mprotect` inside the kernel. Userspace cannot replace a page with a
    /// mapping *only if* the program has not just unmapped it (there is no
    /// conditional `mmap`), so the program says so first. Fails like
    /// [`Engine::unregister`] when unsharing needs memory that is not there:
    /// then nothing is lost and nothing is released.
    pub fn unregister_range(&self, addr: *mut u8, len: usize) -> Result<(), Error> {
        let addr = addr as usize;
        if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Unaligned { addr, len });
        }
        let mut st = self.shared.lock()?;
        let (id, pages) = st.pages_of(addr, len)?;
        let State { ksm, space, .. } = &mut *st;
        ksm.release_range(space, id, pages).map_err(Error::Unmerge)?;
        self.shared.publish(&st);
        Ok(())
    }

    /// Merges `[addr, addr + len)` of registered memory now, whatever `run`
    /// says (merging on request): its pages are merged into stable pages or
    /// with each other as the scanner would, without waiting for their
    /// checksums to hold still over a full scan. Returns the pages merged and
    /// the bytes that saved (`pages_sharing + ksm_zero_pages` grown, times
    /// the page size). Refused like [`Engine::discard`] for a range not
    /// inside one region.
    pub fn merge_now(&self, addr: *mut u8, len: usize) -> Result<Merged, Error> {
        let mut st = self.shared.lock()?;
        let (id, pages) = st.pages_of(addr as usize, len)?;
        let m = st.merge_measured(|ksm, space| ksm.merge_range(space, id, pages).merged);
        self.shared.publish(&st);
        Ok(m)
    }

    /// Discards `[addr, addr + len)` of registered memory, as
    /// `madvise(MADV_DONTNEED)`, `MADV_FREE` or `MADV_REMOVE` would on
    /// anonymous memory: afterwards it reads as zeros ([`Discard::Free`]:
    /// zeros or its old content). A plain `madvise(MADV_DONTNEED)` on a merged
    /// page would not do that: the page maps the pool, and the kernel's
    /// `MADV_DONTNEED` on such a private file mapping brings the pool page
    /// back. The range stays registered and merges again as it fills.
    ///
    /// Refused like the kernel's: `EINVAL` ([`Error::errno`]) for locked
    /// memory; [`Error::NotRegistered`] if the range is not inside one region.
    pub fn discard(&self, addr: *mut u8, len: usize, how: Discard) -> Result<(), Error> {
        let mut st = self.shared.lock()?;
        let (id, pages) = st.pages_of(addr as usize, len)?;
        let State { ksm, space, .. } = &mut *st;
        ksm.discard_range(space, id, pages, how).map_err(Error::Space)?;
        self.shared.publish(&st);
        Ok(())
    }

    /// Gives registered memory an attribute, as `madvise` would, so that
    /// merged memory keeps it (see [`Advice`]): use this instead of a plain
    /// `madvise` for attributes set after registering. The engine applies
    /// the advice to its pool mappings in the range too, reads the region's
    /// attributes again, and stays away from (unmerges) memory given an
    /// attribute merged memory cannot keep (`MADV_WIPEONFORK`).
    pub fn advise(&self, addr: *mut u8, len: usize, advice: Advice) -> Result<(), Error> {
        let mut st = self.shared.lock()?;
        let (id, pages) = st.pages_of(addr as usize, len)?;
        let State { ksm, space, .. } = &mut *st;
        if advice == Advice::WipeOnFork {
            // A file mapping cannot wipe on fork: the range goes back to
            // anonymous memory first, then stays excluded.
            ksm.unmerge_range(space, id, pages.clone()).map_err(Error::Unmerge)?;
        }
        space.advise(id, pages, advice.hint())?;
        st.refresh(id)?;
        self.shared.publish(&st);
        Ok(())
    }

    /// Locks registered memory (`mlock`), merged pages included: they stay
    /// merged, resident and locked (a plain `mlock` would populate a merged
    /// page's private file mapping with a write fault, copying it, and the
    /// copy would not be locked). `unlock = true` is `munlock`.
    pub fn lock(&self, addr: *mut u8, len: usize, unlock: bool) -> Result<(), Error> {
        let mut st = self.shared.lock()?;
        let (id, pages) = st.pages_of(addr as usize, len)?;
        st.space.lock(id, pages, unlock)?;
        st.refresh(id)?;
        self.shared.publish(&st);
        Ok(())
    }

    /// Reads the attributes of every region again (`/proc/self/smaps`), after
    /// the program changed them without [`Engine::advise`] or
    /// [`Engine::lock`]: merged memory then gets them for later merges, and
    /// memory that got one merged memory cannot keep is unmerged and left
    /// alone. (A merge that finds a page's lock state or protection key
    /// changed, or its memory sealed, does this for its region by itself.)
    pub fn refresh_attributes(&self) -> Result<(), Error> {
        let mut st = self.shared.lock()?;
        let ids: Vec<RegionId> = st.regions.keys().copied().collect();
        for id in ids {
            st.refresh(id)?;
        }
        self.shared.publish(&st);
        Ok(())
    }

    /// The pages of region `id` the engine stays away from, as byte ranges,
    /// with the attribute that keeps it away (see the README's merged-memory
    /// section).
    pub fn exclusions(&self, id: RegionId) -> Result<Vec<(Range<usize>, String)>, Error> {
        let st = self.shared.lock()?;
        let &(start, _) = st.regions.get(&id).ok_or(Error::UnknownRegion(id))?;
        Ok(st
            .excluded
            .get(&id)
            .map(|v| {
                v.iter()
                    .map(|(r, why)| {
                        (start + r.start as usize * PAGE_SIZE..start + r.end as usize * PAGE_SIZE, why.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Engine-wide counters, kernel names (as of the last batch).
    pub fn counters(&self) -> Result<Counters, Error> {
        self.shared.check()?;
        Ok(self.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()).counters.clone())
    }

    /// Per-region counters, `/proc/PID/ksm_stat` names.
    pub fn region_counters(&self, id: RegionId) -> Result<RegionCounters, Error> {
        self.shared.check()?;
        let snap = self.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snap.regions.get(&id).cloned().ok_or(Error::UnknownRegion(id))
    }

    /// The fewest stable pages the current mappings need (see
    /// `Ksm::stable_pages_needed`): after churn, defragmentation brings
    /// `pages_shared` down to this.
    pub fn stable_pages_needed(&self) -> Result<u64, Error> {
        Ok(self.shared.lock()?.ksm.stable_pages_needed())
    }

    /// System calls the page space made.
    pub fn space_stats(&self) -> SpaceStats {
        self.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()).stats.clone()
    }

    /// How the link to the daemon stands (`None` for an engine of its own).
    pub fn daemon_link(&self) -> Option<DaemonLinkStatus> {
        self.shared.snapshot.lock().unwrap_or_else(|e| e.into_inner()).link
    }

    /// CPU time the scanner thread has used.
    pub fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.shared.cpu_ns.load(Ordering::Relaxed))
    }

    /// Batches run so far.
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// `Some(reason)` if the scanner thread failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads `vm.max_map_count` (after raising it) for the VMA budget.
    pub fn recount_vmas(&self) -> Result<u64, Error> {
        let mut st = self.shared.lock()?;
        st.space.recount_vmas();
        Ok(st.space.vma_limit())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.lock_state() {
            st.stop = true;
        }
        self.shared.cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn check(&self) -> Result<(), Error> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(Error::EngineFailed(why.clone())),
            None => Ok(()),
        }
    }

    /// Takes the state lock ahead of the scanner thread.
    fn lock(&self) -> Result<MutexGuard<'_, State>, Error> {
        self.check()?;
        self.lock_state().map_err(|_| Error::EngineFailed("the engine's state was poisoned by a panic".into()))
    }

    /// Takes the state lock as a waiter: a scanner running with
    /// `sleep_millisecs = 0` lets the lock go only to waiters.
    fn lock_state(&self) -> std::sync::LockResult<MutexGuard<'_, State>> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let g = self.state.lock();
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        self.cond.notify_all();
        g
    }

    fn publish(&self, st: &State) {
        let mut snap = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snap.counters = st.ksm.counters();
        // The page space's bookkeeping is metadata too, charged as the core's is.
        let extra = st.space.metadata_bytes();
        snap.counters.metadata_bytes += extra;
        snap.counters.general_profit -= extra as i64;
        snap.counters.pages_excluded = st.excluded.values().flatten().map(|(r, _)| r.end - r.start).sum::<u64>();
        snap.regions.clear();
        for id in st.regions.keys() {
            if let Some(c) = st.ksm.region_counters(*id) {
                snap.regions.insert(*id, c);
            }
        }
        snap.stats = st.space.stats().clone();
        snap.link = st.daemon.as_ref().map(|d| DaemonLinkStatus {
            connected: !d.conn.lock().unwrap_or_else(|e| e.into_inner()).is_broken(),
            reconnects: d.reconnects,
        });
        if let Some(d) = &st.daemon {
            // For `samepage status`: this process's ksm_stat, a few times a
            // second; the daemon answers with its orders.
            if d.last.get().elapsed() >= REPORT_EVERY {
                d.last.set(Instant::now());
                let mut r = samepage_daemon::protocol::ProcessStatus {
                    cpu_ns: self.cpu_ns.load(Ordering::Relaxed),
                    full_scans: snap.counters.full_scans,
                    ksm_mergeable: st.regions.values().map(|(start, end)| ((end - start) / PAGE_SIZE) as u64).sum(),
                    merged_now: d.merged_now.get(),
                    memory_bytes: OWN_MEMORY.get().map_or(snap.counters.metadata_bytes, |probe| probe()),
                    counters: Some(Box::new(snap.counters.clone())),
                    ..Default::default()
                };
                for c in snap.regions.values() {
                    r.ksm_rmap_items += c.ksm_rmap_items;
                    r.ksm_zero_pages += c.ksm_zero_pages;
                    r.ksm_merging_pages += c.ksm_merging_pages;
                    r.ksm_process_profit += c.ksm_process_profit;
                }
                // Readers of the counters need not wait for the daemon.
                drop(snap);
                if let Ok(o) = d.conn.lock().unwrap_or_else(|e| e.into_inner()).report(r) {
                    *d.orders.borrow_mut() = Some(o);
                }
            }
        }
    }

    pub(crate) fn unregister(&self, id: RegionId) -> Result<(), Error> {
        let mut st = self.lock()?;
        if !st.regions.contains_key(&id) {
            return Err(Error::UnknownRegion(id));
        }
        let State { ksm, space, .. } = &mut *st;
        ksm.remove_region(space, id).map_err(Error::Unmerge)?;
        st.space.remove_region(id);
        st.regions.remove(&id);
        st.excluded.remove(&id);
        self.publish(&st);
        mem::trim_heap();
        Ok(())
    }
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The scanner thread (the kernel's `ksm_scan_thread`).
fn scanner(shared: Arc<Shared>) {
    let Ok(mut st) = shared.state.lock() else {
        return;
    };
    let mut last_trim: Option<Instant> = None;
    loop {
        if st.stop {
            break;
        }
        // Let API callers in between batches.
        if shared.waiters.load(Ordering::SeqCst) > 0 {
            st = match shared.cond.wait_while(st, |_| shared.waiters.load(Ordering::SeqCst) > 0) {
                Ok(g) => g,
                Err(_) => return,
            };
            continue;
        }
        if st.reconnect_if_due() {
            shared.pool_inode.store(st.space.pool_inode(), Ordering::Relaxed);
        }
        st.follow_orders();
        if st.ksm.tunables().run != Run::Merge || st.regions.is_empty() {
            if st.daemon.is_none() {
                st = match shared.cond.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
                continue;
            }
            // A daemon's client reports while idle too: its orders may
            // start it again, or ask for a merge now.
            st = match shared.cond.wait_timeout(st, REPORT_EVERY) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
            shared.publish(&st);
            continue;
        }
        let now_ms = shared.started.elapsed().as_millis() as u64;
        let State { ksm, space, .. } = &mut *st;
        let cpu_ns = thread_cpu_ns();
        let batch = || {
            if crate::sys::fault::check(crate::sys::fault::Point::ScannerPanic, "scan").is_err() {
                panic!("injected fault: the scanner thread panics");
            }
            ksm.scan_batch_timed(space, now_ms, cpu_ns)
        };
        let report = match catch_unwind(AssertUnwindSafe(batch)) {
            Ok(r) => r,
            Err(p) => {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                return;
            }
        };
        // Attributes a merge found changed behind the engine's back.
        for id in st.space.stale_regions() {
            let _ = st.refresh(id);
        }
        // Memory the indexes gave back (a hash table that grew, a region
        // that left) returns to the system, not just to malloc: at the end of
        // a full scan, at most four times a second.
        if report.full_scan_ended && last_trim.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            mem::trim_heap();
            last_trim = Some(Instant::now());
        }
        shared.publish(&st);
        shared.batches.fetch_add(1, Ordering::Relaxed);
        shared.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        let sleep = st.ksm.tunables().sleep_millisecs;
        if sleep > 0 {
            st = match shared.cond.wait_timeout(st, Duration::from_millis(sleep as u64)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
}

/// Refuses ranges that are not entirely private anonymous read-write memory.
/// Private mappings of the engine's own pool count as anonymous: they are
/// what is left of merged pages written to (pool copies) after an earlier
/// registration, the program's own memory.
fn check_anonymous(addr: usize, end: usize, pool_inode: u64) -> Result<(), Error> {
    let maps = mem::maps_in(addr, end)?;
    let mut pos = addr;
    for m in &maps {
        if m.start > pos {
            return Err(Error::NotAnonymous { addr, end, why: format!("{pos:#x}..{:#x} is not mapped", m.start) });
        }
        let ours = pool_inode != 0 && m.inode == pool_inode;
        let anon_name = m.path.is_empty() || m.path == "[heap]" || m.path.starts_with("[anon:");
        if m.perms != "rw-p" || !(ours || m.inode == 0 && anon_name) {
            let kind = if m.perms.ends_with('s') {
                "shared"
            } else if m.inode != 0 {
                "file-backed"
            } else {
                "not private read-write anonymous"
            };
            return Err(Error::NotAnonymous {
                addr,
                end,
                why: format!("{:#x}..{:#x} {} {} is {kind}", m.start, m.end, m.perms, m.path),
            });
        }
        pos = m.end;
    }
    if pos < end {
        return Err(Error::NotAnonymous { addr, end, why: format!("{pos:#x}..{end:#x} is not mapped") });
    }
    Ok(())
}
