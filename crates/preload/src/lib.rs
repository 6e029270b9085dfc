//! `libsamepage_preload.so`: the kernel's `madvise(MADV_MERGEABLE)` for a
//! program that does not know samepage (`samepage run -- CMD`, which
//! preloads this library).
//!
//! The library defines `madvise`, `munmap`, `mremap`, `mprotect` and `mmap`,
//! so the program's calls through the dynamic linker come here first:
//!
//! * `MADV_MERGEABLE` registers the private anonymous read-write parts of the
//!   range with an engine (created at the first call: a client of the daemon
//!   at `$SAMEPAGE_SOCKET`, or the default socket, when one answers; else an
//!   engine of the process's own with `$SAMEPAGE_TUNABLES`), with the
//!   kernel's errors: `EINVAL` for an unaligned start, `ENOMEM` when part of
//!   the range is unmapped. Other mappings (shared, file-backed, read-only)
//!   are left alone, and the call still succeeds, as the kernel's KSM skips
//!   VMAs it cannot merge.
//! * `MADV_UNMERGEABLE` makes the merged pages of the range private again.
//! * `MADV_DONTNEED`, `MADV_FREE` and `MADV_REMOVE` on registered memory go
//!   through `Engine::discard`, so merged pages read zeros afterwards as
//!   anonymous memory does.
//! * `munmap`, `mremap`, `mprotect` and `mmap(MAP_FIXED)` over registered
//!   memory first take it back from the engine (`unregister_range`: merged
//!   pages become private with their content), then run.
//!
//! * `prctl(PR_SET_MEMORY_MERGE, 1/0)` and `PR_GET_MEMORY_MERGE` (the
//!   kernel's "merge any", 6.4+): every private anonymous mapping, present
//!   and future, is registered by a sweep of `/proc/self/maps` every
//!   [`SWEEP`]; `0` takes everything back. Inherited across fork and exec
//!   (`SAMEPAGE_MERGE_ANY` in the environment). It needs `samepage run`'s
//!   seccomp supervisor (`--merge-any` or `--supervise`): without it the
//!   prctl fails with `EINVAL`.
//!
//! Everything else goes straight to the system call. What an interposed
//! symbol cannot see: the C library's own internal calls (malloc arenas,
//! `realloc`'s `mremap`, thread stacks) and raw `syscall(2)`s. Under the
//! supervisor (`$SAMEPAGE_AGENT_SOCKET`) those are stopped by a seccomp
//! filter before they run and passed to this library's agent thread, which
//! takes the range back first (see `samepage::supervise`); without it only
//! memory the program itself marks may be registered.
//!
//! A forked child (its own engine threads do not survive the fork) first
//! copies the merged pages it inherited into private memory (alone in the
//! child, no other thread can write them meanwhile), then, if the parent
//! had registered memory or merge-any is on, starts an engine of its own
//! and registers the same ranges, as the kernel's `VM_MERGEABLE` is
//! inherited.

#![deny(missing_docs)]

mod heap;

use samepage::supervise::{
    Answer, Hello, OwnTag, Request, AGENT_SOCKET_ENV, DISCARDING_ADVICE, MERGE_ANY_ENV, OWN_TAG_ENV,
};
use samepage::{Discard, Domain, Engine, RegionId, Run, Tunables};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_int, c_long, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// How often merge-any looks for new mappings (the kernel marks them at
/// `mmap` time; ksmd then finds them at its own pace).
pub const SWEEP: Duration = Duration::from_millis(500);

const PAGE: usize = 4096;

/// The live registered ranges: start -> (end, region). Read briefly by
/// every interposed call; written only under `OPS` and never held across a
/// call into the engine (whose own threads may come through here).
static LIVE: RwLock<BTreeMap<usize, (usize, RegionId)>> = RwLock::new(BTreeMap::new());
/// Whether `LIVE` holds anything (the fast path skips the lock).
static ANY: AtomicBool = AtomicBool::new(false);
/// Serializes the calls that change registrations.
static OPS: Mutex<()> = Mutex::new(());
/// The engine, made at the first `MADV_MERGEABLE` (or by merge-any), and
/// the process it belongs to. An engine is never dropped: a forked child
/// forgets its parent's (whose threads are not in the child) and makes its
/// own.
static ENGINE: RwLock<Option<&'static Engine>> = RwLock::new(None);
static OWNER: AtomicI32 = AtomicI32::new(0);
/// Whether making an engine failed in this process (then every
/// `MADV_MERGEABLE` fails with `EAGAIN`).
static FAILED: AtomicI32 = AtomicI32::new(0);
/// Serializes making the engine.
static MAKING: Mutex<()> = Mutex::new(());
/// `prctl(PR_SET_MEMORY_MERGE)` is on.
static MERGE_ANY: AtomicBool = AtomicBool::new(false);
/// The fd of the connection to the supervisor the agent thread serves (-1
/// without one): a forked child closes its copy, so the supervisor sees the
/// connection end with the process that made it.
static AGENT_FD: AtomicI32 = AtomicI32::new(-1);
/// Whether the sweeper thread of this process runs.
static SWEEPER: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// Set while this thread is inside the library: its own calls go
    /// straight to the kernel.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// The program's threads inside the library right now (their engine work
/// may hold the engine's lock): a hidden call one of them makes meanwhile
/// (the C library's own, e.g. `closedir`'s `free` trimming the heap) is the
/// library's, and the agent lets it run without taking the lock it holds.
static INSIDE_TIDS: [std::sync::atomic::AtomicU32; 64] = [const { std::sync::atomic::AtomicU32::new(0) }; 64];

fn inside_enter(tid: u32) -> Option<usize> {
    (0..INSIDE_TIDS.len())
        .find(|&i| INSIDE_TIDS[i].compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

fn is_inside(tid: u32) -> bool {
    INSIDE_TIDS.iter().any(|t| t.load(Ordering::Acquire) == tid)
}

fn set_errno(errno: c_int) {
    // SAFETY: returns this thread's errno slot, valid for its whole life.
    let slot = unsafe { libc::__errno_location() };
    // SAFETY: the slot is valid for writes (above).
    unsafe { *slot = errno };
}

/// Whether this process owns the engine (not a forked child) and this
/// thread is not already inside the library.
fn managed() -> bool {
    ANY.load(Ordering::Acquire) && OWNER.load(Ordering::Relaxed) == pid() && !INSIDE.with(|i| i.get())
}

/// Runs `f` marked as inside the library; turns its errno into -1.
fn inside(f: impl FnOnce() -> Result<(), c_int>) -> c_int {
    INSIDE.with(|i| i.set(true));
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
    let slot = inside_enter(tid);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(Err(libc::EIO));
    if let Some(s) = slot {
        INSIDE_TIDS[s].store(0, Ordering::Release);
    }
    INSIDE.with(|i| i.set(false));
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// The registered intervals meeting `[a, b)`, clipped to it.
fn overlapping(a: usize, b: usize) -> Vec<(usize, usize, RegionId)> {
    let live = LIVE.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    let first = live.range(..a).next_back().filter(|(_, (e, _))| *e > a).map(|(s, _)| *s);
    for (&s, &(e, id)) in live.range(first.unwrap_or(a)..b) {
        if e > a {
            out.push((s.max(a), e.min(b), id));
        }
    }
    out
}

/// A copy of where [`LIVE`]'s ranges lie that the agent reads without any
/// lock: neighbouring ranges joined, up to [`SNAPSHOT_RANGES`] of them (more
/// are summed up by their bounds). Written under `LIVE`'s write lock after
/// every change, read as a sequence lock.
///
/// Why: a stopped call the agent serves may come from inside the C
/// library's malloc, holding an arena's lock (a thread arena's heap shrunk
/// with `MADV_DONTNEED`, the main heap with `brk`). If another thread forks
/// meanwhile, `fork()` waits for that arena's lock after the prepare handler
/// took this library's locks ([`before_fork`]); serving the call behind
/// them would never end. While a fork holds the library's operations lock
/// no registration changes, so this copy is exact, and a call on memory
/// nothing is registered in is answered from it at once (see
/// `ops_for_agent`). Otherwise the agent waits for the lock: a range being
/// registered shows here only once registered.
mod snapshot {
    use std::sync::atomic::{fence, AtomicUsize, Ordering};

    /// How many ranges the snapshot keeps one by one.
    pub const SNAPSHOT_RANGES: usize = 64;

    static SEQ: AtomicUsize = AtomicUsize::new(0);
    /// How many of `RANGES` hold; `usize::MAX`: only `BOUNDS` does.
    static LEN: AtomicUsize = AtomicUsize::new(0);
    static RANGES: [[AtomicUsize; 2]; SNAPSHOT_RANGES] =
        [const { [AtomicUsize::new(0), AtomicUsize::new(0)] }; SNAPSHOT_RANGES];
    static BOUNDS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

    /// Publishes `ranges` (sorted, not overlapping). The caller holds
    /// `LIVE`'s write lock, so writers never race.
    pub fn publish(ranges: impl Iterator<Item = (usize, usize)>) {
        let seq = SEQ.load(Ordering::Relaxed);
        SEQ.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let (mut n, mut lo, mut hi) = (0usize, usize::MAX, 0usize);
        let mut last: Option<(usize, usize)> = None;
        let put = |(a, b): (usize, usize), n: &mut usize| {
            if *n < SNAPSHOT_RANGES {
                RANGES[*n][0].store(a, Ordering::Relaxed);
                RANGES[*n][1].store(b, Ordering::Relaxed);
            }
            *n += 1;
        };
        for (a, b) in ranges {
            lo = lo.min(a);
            hi = hi.max(b);
            match &mut last {
                Some((_, end)) if *end == a => *end = b,
                _ => {
                    if let Some(r) = last.take() {
                        put(r, &mut n);
                    }
                    last = Some((a, b));
                }
            }
        }
        if let Some(r) = last {
            put(r, &mut n);
        }
        BOUNDS[0].store(lo, Ordering::Relaxed);
        BOUNDS[1].store(hi, Ordering::Relaxed);
        LEN.store(if n <= SNAPSHOT_RANGES { n } else { usize::MAX }, Ordering::Relaxed);
        SEQ.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// Whether `[a, b)` may meet a registered range: `false` only when the
    /// snapshot says for sure that it does not.
    pub fn may_meet(a: usize, b: usize) -> bool {
        for _ in 0..100 {
            let seq = SEQ.load(Ordering::Acquire);
            if seq % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let meets = |r: &[AtomicUsize; 2]| r[0].load(Ordering::Relaxed) < b && a < r[1].load(Ordering::Relaxed);
            let len = LEN.load(Ordering::Relaxed);
            let answer = if len == usize::MAX { meets(&BOUNDS) } else { RANGES[..len].iter().any(meets) };
            fence(Ordering::Acquire);
            if SEQ.load(Ordering::Relaxed) == seq {
                return answer;
            }
        }
        true
    }
}

fn tunables_from_env() -> Result<Tunables, c_int> {
    // `samepage run` merges as a running ksmd would.
    let mut t = Tunables { run: Run::Merge, ..Tunables::default() };
    if let Ok(spec) = std::env::var("SAMEPAGE_TUNABLES") {
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or(libc::EINVAL)?;
            t.set(k, v).map_err(|e| e.errno())?;
        }
    }
    Ok(t)
}

fn pid() -> i32 {
    std::process::id() as i32
}

/// The engine: a daemon's client when one answers, else one of this
/// process's own. `None` if neither could start (every `MADV_MERGEABLE`
/// then fails with `EAGAIN`, as the kernel's does without memory). Under
/// the supervisor the agent is connected before the engine is handed out,
/// so nothing is registered before the program's hidden calls are seen.
fn engine() -> Option<&'static Engine> {
    let me = pid();
    if OWNER.load(Ordering::Acquire) == me {
        if let Some(e) = *ENGINE.read().unwrap_or_else(|e| e.into_inner()) {
            return Some(e);
        }
    }
    if FAILED.load(Ordering::Relaxed) == me {
        return None;
    }
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    if OWNER.load(Ordering::Acquire) == me {
        if let Some(e) = *ENGINE.read().unwrap_or_else(|e| e.into_inner()) {
            return Some(e);
        }
    }
    let made = (|| {
        // The library's allocations come from its own heap (`heap`):
        // trimming the C library's would only touch the program's memory.
        samepage::set_heap_trim(false);
        // What the engine costs this process: its heap, as far as resident.
        samepage::set_own_memory_probe(|| samepage::resident_bytes(&heap::chunks()));
        let t = tunables_from_env().ok()?;
        let socket = std::env::var_os("SAMEPAGE_SOCKET")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(samepage_daemon::default_socket);
        let domain = std::env::var("SAMEPAGE_DOMAIN").ok().and_then(|d| d.parse().ok()).unwrap_or(0);
        let own = std::env::var("SAMEPAGE_MODE").is_ok_and(|m| m == "process");
        let e = if own { None } else { Engine::connect(&socket, Domain(domain), t.clone()).ok() };
        let e = e.or_else(|| Engine::new(t).ok())?;
        if supervised() {
            if let Err(err) = start_agent() {
                eprintln!("samepage: cannot reach the supervisor's agent socket: {err}");
                return None;
            }
        }
        Some(&*Box::leak(Box::new(e)))
    })();
    match made {
        Some(e) => {
            *ENGINE.write().unwrap_or_else(|e| e.into_inner()) = Some(e);
            OWNER.store(me, Ordering::Release);
        }
        None => FAILED.store(me, Ordering::Relaxed),
    }
    made
}

/// Whether `samepage run`'s supervisor stops this process's hidden mapping
/// changes.
fn supervised() -> bool {
    std::env::var_os(AGENT_SOCKET_ENV).is_some()
}

/// The private anonymous read-write parts of `[a, b)` and whether all of
/// it is mapped (`/proc/self/maps`).
fn mergeable_parts(a: usize, b: usize) -> (Vec<(usize, usize)>, bool) {
    let (mut parts, mut pos) = (Vec::new(), a);
    let mut covered = true;
    for m in samepage::maps_in(a, b).unwrap_or_default() {
        if m.start > pos {
            covered = false;
        }
        pos = pos.max(m.end);
        if private_anon_rw(&m) {
            parts.push((m.start.max(a), m.end.min(b)));
        }
    }
    (parts, covered && pos >= b)
}

/// A private anonymous read-write mapping (what the kernel's KSM merges).
fn private_anon_rw(m: &samepage::MapsLine) -> bool {
    let anon = m.inode == 0 && (m.path.is_empty() || m.path.starts_with("[anon:") || m.path == "[heap]");
    anon && m.perms.starts_with("rw") && m.perms.ends_with('p')
}

fn register(a: usize, b: usize) -> Result<(), c_int> {
    let e = engine().ok_or(libc::EAGAIN)?;
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    let (parts, covered) = mergeable_parts(a, b);
    register_parts(e, &parts)?;
    if covered {
        Ok(())
    } else {
        Err(libc::ENOMEM)
    }
}

/// Registers the parts of `parts` not registered yet (`OPS` held).
fn register_parts(e: &Engine, parts: &[(usize, usize)]) -> Result<(), c_int> {
    for &(s, e2) in parts {
        // The gaps of [s, e2) not registered yet.
        let registered: Vec<(usize, usize)> = overlapping(s, e2).iter().map(|&(a, b, _)| (a, b)).collect();
        for (gs, ge) in outside(&registered, s, e2) {
            // SAFETY: the program asked for this memory to be merged; the
            // library takes it back before any munmap, mremap, mprotect or
            // mmap(MAP_FIXED) over it comes through (the register contract).
            let id =
                unsafe { e.register(gs as *mut u8, ge - gs) }.map_err(|err| err.errno().unwrap_or(libc::EAGAIN))?;
            let mut live = LIVE.write().unwrap_or_else(|e| e.into_inner());
            live.insert(gs, (ge, id));
            snapshot::publish(live.iter().map(|(s, (e, _))| (*s, *e)));
            ANY.store(true, Ordering::Release);
        }
    }
    Ok(())
}

/// Takes `[a, b)` back from the engine (its merged pages become private,
/// content intact) and forgets it.
fn take_back(a: usize, b: usize) -> Result<(), c_int> {
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    take_back_locked(a, b)
}

/// [`take_back`] with `OPS` held by the caller.
fn take_back_locked(a: usize, b: usize) -> Result<(), c_int> {
    if !ANY.load(Ordering::Acquire) || OWNER.load(Ordering::Acquire) != pid() {
        return Ok(());
    }
    let Some(e) = engine() else { return Ok(()) };
    let parts = overlapping(a, b);
    if parts.is_empty() {
        return Ok(());
    }
    let mut left: HashMap<RegionId, usize> = HashMap::new();
    for (os, oe, id) in parts {
        e.unregister_range(os as *mut u8, oe - os).map_err(|err| err.errno().unwrap_or(libc::EAGAIN))?;
        let mut live = LIVE.write().unwrap_or_else(|e| e.into_inner());
        let start = live.range(..=os).next_back().map(|(s, _)| *s).expect("overlapping came from it");
        let (end, _) = live.remove(&start).expect("present");
        if start < os {
            live.insert(start, (os, id));
        }
        if oe < end {
            live.insert(oe, (end, id));
        }
        left.insert(id, live.values().filter(|(_, r)| *r == id).count());
        snapshot::publish(live.iter().map(|(s, (e, _))| (*s, *e)));
        ANY.store(!live.is_empty(), Ordering::Release);
    }
    // A region with nothing live left is unregistered (its id freed).
    for (id, n) in left {
        if n == 0 {
            let _ = e.unregister(id);
        }
    }
    Ok(())
}

/// The program's call `nr`, made for it. Tagged as the engine's own, so the
/// supervisor's filter lets it through: a call that unmaps, changes or
/// discards memory is made only through [`changing`] or the discarding
/// arm of [`madvise`], after what it touches was taken back, with `OPS`
/// held so that nothing is registered there in between.
fn raw(nr: c_long, args: [usize; 6]) -> c_long {
    // SAFETY: a system call with the program's own arguments, as the C
    // library's wrapper would make it (the tag goes in bits the kernel
    // ignores for it); errno is set on failure, as the wrapper's.
    unsafe { samepage::supervise::own_syscall(nr, args) }.map_or(-1, |r| r as c_long)
}

/// `madvise(2)`, with `MADV_MERGEABLE`/`MADV_UNMERGEABLE` served by samepage.
///
/// # Safety
/// As `madvise(2)`.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let (a, l) = (addr as usize, len);
    let b = a.saturating_add(l.div_ceil(PAGE) * PAGE);
    let outside = INSIDE.with(|i| !i.get());
    match advice {
        libc::MADV_MERGEABLE | libc::MADV_UNMERGEABLE if outside => {
            if !a.is_multiple_of(PAGE) || a.checked_add(l).is_none() {
                set_errno(libc::EINVAL);
                return -1;
            }
            if l == 0 {
                return 0;
            }
            if advice == libc::MADV_MERGEABLE {
                inside(|| register(a, b))
            } else {
                inside(|| take_back(a, b))
            }
        }
        d if DISCARDING_ADVICE.contains(&d) && outside => {
            let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
            let parts = if managed() { overlapping(a, b) } else { Vec::new() };
            if parts.is_empty() {
                return raw(libc::SYS_madvise, [a, l, advice as usize, 0, 0, 0]) as c_int;
            }
            if !a.is_multiple_of(PAGE) {
                set_errno(libc::EINVAL);
                return -1;
            }
            inside(|| discard(a, b, advice, &parts))
        }
        _ => raw(libc::SYS_madvise, [a, l, advice as usize, 0, 0, 0]) as c_int,
    }
}

/// `MADV_DONTNEED`, `MADV_FREE` or `MADV_REMOVE` (`advice`) over `[a, b)`:
/// through the engine on the registered `parts` (so merged pages read zeros
/// afterwards), straight to the kernel between them.
fn discard(a: usize, b: usize, advice: c_int, parts: &[(usize, usize, RegionId)]) -> Result<(), c_int> {
    let plain = |from: usize, to: usize| {
        if from < to && raw(libc::SYS_madvise, [from, to - from, advice as usize, 0, 0, 0]) != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL));
        }
        Ok(())
    };
    let mut pos = a;
    for &(os, oe, _) in parts {
        plain(pos, os)?;
        discard_registered(os, oe, advice)?;
        pos = oe;
    }
    plain(pos, b)
}

/// A discarding `advice` on registered `[a, b)`, through the engine (so
/// merged pages read zeros afterwards, as anonymous memory does).
fn discard_registered(a: usize, b: usize, advice: c_int) -> Result<(), c_int> {
    let how = match advice {
        libc::MADV_FREE => Discard::Free,
        libc::MADV_REMOVE => Discard::Remove,
        // MADV_DONTNEED, MADV_DONTNEED_LOCKED
        _ => Discard::DontNeed,
    };
    let e = engine().ok_or(libc::EAGAIN)?;
    e.discard(a as *mut u8, b - a, how).map_err(|err| err.errno().unwrap_or(libc::EINVAL))
}

/// Makes `call`, a call of the program that unmaps, replaces or changes
/// the memory of `ranges` (start, length), after taking back what is
/// registered there; -1 with errno when that fails (nothing changed).
/// `OPS` is held across both, so a sweep cannot register the range in
/// between: the call is tagged ([`raw`]) and the supervisor's agent would
/// not see it.
fn changing(ranges: &[(usize, usize)], call: impl FnOnce() -> c_long) -> c_long {
    if INSIDE.with(|i| i.get()) {
        return call();
    }
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    for &(a, len) in ranges {
        if !managed() || !a.is_multiple_of(PAGE) {
            continue;
        }
        let b = a.saturating_add(len.div_ceil(PAGE) * PAGE);
        if !overlapping(a, b).is_empty() && inside(|| take_back_locked(a, b)) != 0 {
            return -1;
        }
    }
    call()
}

/// `munmap(2)`, taking registered memory back first.
///
/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    changing(&[(addr as usize, len)], || raw(libc::SYS_munmap, [addr as usize, len, 0, 0, 0, 0])) as c_int
}

/// `mprotect(2)`, taking registered memory back first.
///
/// # Safety
/// As `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    changing(&[(addr as usize, len)], || raw(libc::SYS_mprotect, [addr as usize, len, prot as usize, 0, 0, 0])) as c_int
}

/// `mremap(2)`, taking registered memory back first. The C prototype is
/// variadic (`new_address` only with `MREMAP_FIXED`); on x86-64 the fifth
/// argument arrives in the same register either way, and is read only when
/// the flags say it was passed.
///
/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    let to = if fixed { new_addr as usize } else { 0 };
    let ranges = [(old as usize, old_len), (to, if fixed { new_len } else { 0 })];
    // -1 on failure: MAP_FAILED.
    changing(&ranges, || raw(libc::SYS_mremap, [old as usize, old_len, new_len, flags as usize, to, 0])) as *mut c_void
}

/// `mmap(2)`, taking registered memory back first when `MAP_FIXED`
/// replaces it.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: libc::off_t,
) -> *mut c_void {
    let call =
        || raw(libc::SYS_mmap, [addr as usize, len, prot as usize, flags as usize, fd as usize, offset as usize]);
    // A mapping at a free address touches nothing registered. -1 on failure: MAP_FAILED.
    if flags & libc::MAP_FIXED != 0 {
        changing(&[(addr as usize, len)], call) as *mut c_void
    } else {
        call() as *mut c_void
    }
}

// ---------------------------------------------------------------------------
// The agent: serves the supervisor's stopped calls of this process.

/// Starts the `samepage-agent` thread, which connects to the supervisor and
/// says hello ([`hello`]), then serves this process's stopped calls; returns
/// once the hello was acknowledged (or failed).
fn start_agent() -> std::io::Result<()> {
    // The agent thread is made first and says hello itself: once the
    // supervisor has the hello, this process's stopped calls go to the
    // agent, and the thread creation's own calls (the new stack's mmap and
    // guard mprotect) would wait for an agent that does not exist yet.
    let (tx, rx) = std::sync::mpsc::channel();
    samepage::spawn_engine_thread("samepage-agent", move || match hello() {
        Ok(s) => {
            AGENT_FD.store(std::os::fd::AsRawFd::as_raw_fd(&s), Ordering::Release);
            let _ = tx.send(Ok(()));
            agent(s)
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    })?;
    rx.recv().map_err(|_| std::io::Error::other("the agent thread died"))?
}

/// Connects to the supervisor's agent socket and says hello (this pid, this
/// library's code range: calls made from it are the engine's own and run at
/// once); returns after the ack.
fn hello() -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let path = std::env::var_os(AGENT_SOCKET_ENV).ok_or(std::io::ErrorKind::NotFound)?;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    let here = start_agent as *const () as usize;
    let text = samepage::maps_in(here, here + 1)
        .ok()
        .and_then(|m| m.into_iter().find(|m| m.start <= here && here < m.end))
        .map_or(0..0, |m| m.start as u64..m.end as u64);
    s.write_all(&Hello { pid: pid() as u32, text }.encode())?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(s)
}

fn agent(mut s: std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    INSIDE.with(|i| i.set(true));
    let mut wire = [0u8; Request::LEN];
    while s.read_exact(&mut wire).is_ok() {
        let req = Request::decode(&wire);
        let answer = if is_inside(req.tid) { Answer::Run } else { serve_stopped(&req) };
        if s.write_all(&answer.encode()).is_err() {
            return;
        }
    }
}

/// Takes back (or discards through the engine) what the stopped call
/// `req` is about to change, and says how the call goes on: it runs, or
/// it is refused (see `ops_for_agent`).
fn serve_stopped(req: &Request) -> Answer {
    use samepage::supervise::nr;
    let call = req.nr;
    let arg = |i: usize| req.args[i] as usize;
    let pages = |a: usize, len: usize| a.saturating_add(len.div_ceil(PAGE) * PAGE);
    // What the call changes: at most two ranges, kept off the heap (see
    // `ops_for_agent`).
    let mut touched: [Option<(usize, usize)>; 2] = [None, None];
    match call {
        nr::MUNMAP | nr::MPROTECT | nr::MMAP | nr::MADVISE if arg(0).is_multiple_of(PAGE) => {
            touched[0] = Some((arg(0), pages(arg(0), arg(1))));
        }
        nr::MREMAP if arg(0).is_multiple_of(PAGE) => {
            touched[0] = Some((arg(0), pages(arg(0), arg(1))));
            if arg(3) as c_int & libc::MREMAP_FIXED != 0 && arg(4).is_multiple_of(PAGE) {
                touched[1] = Some((arg(4), pages(arg(4), arg(2))));
            }
        }
        nr::BRK if arg(0) != 0 => {
            // Shrinking the heap unmaps [new, current break) (brk(0) reads
            // the break; the agent's own calls run at once).
            let brk_now = raw(libc::SYS_brk, [0; 6]) as usize;
            let new = arg(0).next_multiple_of(PAGE);
            if new < brk_now {
                touched[0] = Some((new, brk_now.next_multiple_of(PAGE)));
            }
        }
        // Unaligned: the kernel refuses it with EINVAL and changes nothing.
        _ => {}
    }
    if touched.iter().all(Option::is_none) {
        return Answer::Run;
    }
    // A refused trim (`MADV_DONTNEED`, `brk` shrinking) costs nothing but
    // memory not given back yet; a refused `munmap` or `mremap` may leak a
    // mapping: wait longer for those.
    let patience = if matches!(call, nr::MADVISE | nr::BRK) { TRIM_PATIENCE } else { FORK_PATIENCE };
    let _ops = match ops_for_agent(&touched, patience) {
        ForAgent::Held(ops) => ops,
        ForAgent::NothingThere => return Answer::Run,
        // Refused as the kernel refuses it, nothing changed: glibc's trims
        // (the calls that can hold up a fork) take that in their stride.
        ForAgent::Refuse => {
            return match call {
                // The break as it is now (`brk` refusing returns it).
                nr::BRK => Answer::Return(raw(libc::SYS_brk, [0; 6]) as u64),
                nr::MADVISE => Answer::Fail(libc::EAGAIN),
                _ => Answer::Fail(libc::ENOMEM),
            };
        }
    };
    let r = std::panic::catch_unwind(|| {
        for (a, b) in touched.into_iter().flatten() {
            if call == nr::MADVISE {
                // The kernel then discards the rest of the range itself.
                for (os, oe, _) in overlapping(a, b) {
                    discard_registered(os, oe, arg(2) as c_int)?;
                }
            } else {
                take_back_locked(a, b)?;
            }
        }
        Ok(())
    })
    .unwrap_or(Err(libc::EIO));
    Answer::from_errno(r.err().unwrap_or(0))
}

/// How long the agent waits for the library's operations while a fork
/// holds them, before it refuses the call it serves (see [`ops_for_agent`]):
/// for a call whose refusal may leak a mapping, a fork of a very large
/// process included.
const FORK_PATIENCE: Duration = Duration::from_millis(500);
/// The same for a trim (`MADV_DONTNEED`, `brk` shrinking), which a refusal
/// costs nothing but memory given back later: the calls the C library makes
/// under an arena's lock, which the fork then waits for.
const TRIM_PATIENCE: Duration = Duration::from_millis(10);

/// Set while `fork()` holds the library's operations lock: from when
/// `before_fork` took it to the start of an after handler. Meanwhile no
/// registration changes, so the [`snapshot`] is exact.
static FORK_HOLDS: AtomicBool = AtomicBool::new(false);
/// When the fork took it (monotonic clock, nanoseconds).
static FORK_SINCE: AtomicU64 = AtomicU64::new(0);

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// What the agent may do about a stopped call on `touched` memory.
enum ForAgent {
    /// The library's operations lock, held: serve the call.
    Held(std::sync::MutexGuard<'static, ()>),
    /// A fork holds the lock, and nothing is registered there: let it run.
    NothingThere,
    /// A fork has held the lock for the call's patience: refuse the call.
    Refuse,
}

/// The library's operations lock, for the agent serving a stopped call
/// that changes `touched`.
///
/// A thread inside the C library's malloc holds its arena's lock while its
/// hidden trimming call (`brk`, `MADV_DONTNEED`) waits for this agent, and
/// `fork()` takes every arena's lock after the prepare handler took this
/// library's: waiting for the fork would never end. So the agent waits
/// without blocking (a blocked `lock` could not look at the fork). While a
/// fork holds the lock, a call on memory where nothing is registered runs
/// at once (`behaviours fork-trim 200` under `samepage run --supervise`
/// hung every run before); one on registered memory is refused once the
/// fork has held the lock for `patience`: nothing changes, as when the
/// kernel refuses it (under `--merge-any`, where the heaps are registered,
/// the same program hung every run before).
fn ops_for_agent(touched: &[Option<(usize, usize)>], patience: Duration) -> ForAgent {
    loop {
        match OPS.try_lock() {
            Ok(g) => return ForAgent::Held(g),
            Err(std::sync::TryLockError::Poisoned(e)) => return ForAgent::Held(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if FORK_HOLDS.load(Ordering::Acquire) {
            let since = FORK_SINCE.load(Ordering::Acquire);
            let nothing_there = !touched.iter().flatten().any(|&(a, b)| snapshot::may_meet(a, b));
            // What was read holds only if the same fork held the lock all
            // along (a registration between two forks publishes late; a
            // fork that ended is no reason to refuse).
            if FORK_HOLDS.load(Ordering::Acquire) && FORK_SINCE.load(Ordering::Acquire) == since {
                if nothing_there {
                    return ForAgent::NothingThere;
                }
                if monotonic_ns().saturating_sub(since) >= patience.as_nanos() as u64 {
                    return ForAgent::Refuse;
                }
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

// ---------------------------------------------------------------------------
// Merge any: prctl(PR_SET_MEMORY_MERGE).

const PR_SET_MEMORY_MERGE: c_int = 67;
const PR_GET_MEMORY_MERGE: c_int = 68;

/// The address ranges of every loaded object's segments (its `.data` and
/// `.bss` included: the C library's and this library's own statics).
fn object_segments() -> Vec<(usize, usize)> {
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: the C library passes a valid `info` for the duration of
        // the callback, and `data` is the Vec given to dl_iterate_phdr below.
        let info = unsafe { &*info };
        // SAFETY: `data` is the Vec given to dl_iterate_phdr below, alive
        // and borrowed by nothing else during the call.
        let out = unsafe { &mut *data.cast::<Vec<(usize, usize)>>() };
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            let ph = unsafe { info.dlpi_phdr.add(i) };
            // SAFETY: as above: a valid program header.
            let ph = unsafe { &*ph };
            if ph.p_type == libc::PT_LOAD {
                let start = (info.dlpi_addr as usize + ph.p_vaddr as usize) & !(PAGE - 1);
                let end = (info.dlpi_addr as usize + (ph.p_vaddr + ph.p_memsz) as usize).next_multiple_of(PAGE);
                out.push((start, end));
            }
        }
        0
    }
    let mut out: Vec<(usize, usize)> = Vec::new();
    // SAFETY: the callback only reads what it is given and pushes to `out`,
    // which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), std::ptr::from_mut(&mut out).cast()) };
    out
}

/// The parts of `[a, b)` outside every one of `ranges` (sorted by start).
///
/// A line of `/proc/self/maps` is a VMA, and the kernel joins neighbouring
/// anonymous mappings of the same flags into one: the program's buffer and
/// the engine's scratch memory right above it read as one line. So the
/// engine's ranges are cut out of a line, never a reason to pass it over.
fn outside(ranges: &[(usize, usize)], a: usize, b: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = a;
    for &(s, e) in ranges.iter().filter(|&&(s, e)| s < b && a < e) {
        if s > pos {
            out.push((pos, s));
        }
        pos = pos.max(e);
    }
    if pos < b {
        out.push((pos, b));
    }
    out
}

/// One sweep: registers every private anonymous read-write mapping not
/// registered yet, except the engine's own memory, this library's heap,
/// loaded objects' segments, and stacks (the main one and every thread's:
/// a mapping right above a `---p` guard). Stacks are left out because the
/// engine's code runs on the program's threads too (interposed calls), and
/// a thread must never fault on a merged page of its own stack while it
/// holds the engine's lock.
fn sweep(e: &Engine) {
    let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    if !MERGE_ANY.load(Ordering::Acquire) {
        return;
    }
    let Ok(maps) = samepage::maps_in(0, usize::MAX) else { return };
    let mut skip = object_segments();
    skip.extend(heap::chunks());
    skip.extend(samepage::engine_mappings());
    skip.sort_unstable();
    let mut parts = Vec::new();
    let mut prev: Option<samepage::MapsLine> = None;
    for m in maps {
        // A thread's stack sits right above its guard: a small inaccessible
        // anonymous mapping (glibc's default guard is a page). The
        // inaccessible tail of a malloc arena's heap (up to 64 MiB) is not
        // a guard: a mapping the kernel placed right above one (a large
        // malloc'ed buffer) is the program's data.
        const GUARD_MAX: usize = 1 << 20;
        let guard_below = prev
            .as_ref()
            .is_some_and(|p| p.end == m.start && p.perms == "---p" && p.inode == 0 && p.end - p.start <= GUARD_MAX);
        let stack = m.path == "[stack]" || (guard_below && m.path.is_empty());
        if private_anon_rw(&m) && !stack && !m.path.starts_with("[anon:samepage") {
            let pieces = outside(&skip, m.start, m.end).into_iter();
            for (a, b) in pieces.flat_map(|(a, b)| outside(&arena_heads(a, b), a, b)) {
                // Neighbouring mappings go in as one range (registering reads
                // the attributes of its range once).
                match parts.last_mut() {
                    Some((_, end)) if *end == a => *end = b,
                    _ => parts.push((a, b)),
                }
            }
        }
        prev = Some(m);
    }
    // Each part on its own: one the engine refuses must not keep the rest
    // out.
    for part in parts {
        if let Err(errno) = register_parts(e, &[part]) {
            if std::env::var_os("SAMEPAGE_DEBUG").is_some() {
                eprintln!("samepage: sweep: {:#x}-{:#x} not registered: errno {errno}", part.0, part.1);
            }
        }
    }
}

/// The first page of every 64 MiB-aligned stretch of `[a, b)`: where the C
/// library's malloc puts the header of a thread arena's heap (`heap_info`
/// and the arena's `malloc_state`, its mutex included; `malloc/arena.c`,
/// `new_heap` aligns each heap to `HEAP_MAX_SIZE`). A sweep leaves them
/// out: `fork()` locks every arena's mutex after the library's prepare
/// handler took its locks, and a merged header page would make that write
/// wait for the copy-on-write breaker, which maps and allocates under
/// those locks. One page in 16,384 of other memory is left out with them.
fn arena_heads(a: usize, b: usize) -> Vec<(usize, usize)> {
    const HEAP_MAX_SIZE: usize = 64 << 20;
    (a.next_multiple_of(HEAP_MAX_SIZE)..b).step_by(HEAP_MAX_SIZE).map(|h| (h, h + PAGE)).collect()
}

/// Starts the sweeper of this process (once per process) on a thread of
/// its own.
fn start_sweeper() {
    if claim_sweeper() {
        let _ = samepage::spawn_engine_thread("samepage-sweep", sweep_loop);
    }
}

/// Whether the calling thread may become this process's sweeper (none runs).
fn claim_sweeper() -> bool {
    SWEEPER.swap(pid(), Ordering::AcqRel) != pid()
}

/// The sweeper: a sweep every [`SWEEP`] while merge-any lasts.
fn sweep_loop() {
    let me = pid();
    INSIDE.with(|i| i.set(true));
    loop {
        while pid() == me && MERGE_ANY.load(Ordering::Acquire) {
            if let Some(e) = engine() {
                sweep(e);
            }
            std::thread::sleep(SWEEP);
        }
        let _ = SWEEPER.compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        // Merge-any turned on again while this loop was leaving: its
        // `start_sweeper` found this one still claimed, so this one stays.
        if !(pid() == me && MERGE_ANY.load(Ordering::Acquire) && claim_sweeper()) {
            break;
        }
    }
}

fn set_merge_any(on: bool) -> Result<(), c_int> {
    if on {
        if !supervised() {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "samepage: prctl(PR_SET_MEMORY_MERGE) needs the supervisor (samepage run --supervise or \
                     --merge-any): refused with EINVAL"
                );
            }
            return Err(libc::EINVAL);
        }
        engine().ok_or(libc::EAGAIN)?;
        MERGE_ANY.store(true, Ordering::Release);
        // The program's exec'd images inherit merge-any from the
        // environment, as the kernel's flag survives exec. A thread of the
        // program reading the environment (`getenv`) at this moment races
        // with it, as with a `setenv` of its own: Rust's lock does not
        // cover the C library's readers. Accepted: the prctl is made once,
        // early, by the program itself.
        std::env::set_var(MERGE_ANY_ENV, "1");
        start_sweeper();
        Ok(())
    } else {
        MERGE_ANY.store(false, Ordering::Release);
        std::env::remove_var(MERGE_ANY_ENV);
        // As the kernel's: everything unmerged.
        take_back(0, usize::MAX - PAGE)
    }
}

/// `prctl(2)`, with `PR_SET_MEMORY_MERGE` and `PR_GET_MEMORY_MERGE` served
/// by samepage. The C prototype is variadic; on x86-64 the arguments arrive
/// in the same registers either way.
///
/// # Safety
/// As `prctl(2)`.
#[no_mangle]
pub unsafe extern "C" fn prctl(option: c_int, a2: usize, a3: usize, a4: usize, a5: usize) -> c_int {
    match option {
        PR_SET_MEMORY_MERGE | PR_GET_MEMORY_MERGE if INSIDE.with(|i| !i.get()) => {
            if a3 != 0 || a4 != 0 || a5 != 0 || (option == PR_GET_MEMORY_MERGE && a2 != 0) || a2 > 1 {
                set_errno(libc::EINVAL);
                return -1;
            }
            if option == PR_GET_MEMORY_MERGE {
                return MERGE_ANY.load(Ordering::Acquire) as c_int;
            }
            inside(|| set_merge_any(a2 == 1))
        }
        _ => raw(libc::SYS_prctl, [option as usize, a2, a3, a4, a5, 0]) as c_int,
    }
}

// ---------------------------------------------------------------------------
// Fork and exec.

/// The library's heap, locked.
type HeapGuard = lock_api::MutexGuard<'static, spin::Mutex<()>, talc::Talc<heap::MapMore>>;

/// Where `before_fork` keeps the locks it holds across `fork`: a static,
/// in this library's own data, which is never registered, so never merged.
/// A thread-local would sit in the forking thread's TLS block, which a
/// merge-any sweep may register (the main thread's is an anonymous mapping):
/// merged, the first write to it after the locks are taken would wait for
/// the copy-on-write breaker, which maps and allocates under locks held
/// here.
struct ForkingSlot(std::cell::UnsafeCell<Option<Forking>>);

// SAFETY: only the thread inside `fork()` touches the slot, from its
// prepare handler to its after handler (in the parent, or the child's only
// thread); `MAKING`, taken first in `before_fork` and released only after
// the slot is emptied, keeps any other fork out meanwhile.
unsafe impl Sync for ForkingSlot {}

static FORKING: ForkingSlot = ForkingSlot(std::cell::UnsafeCell::new(None));

/// Empties [`FORKING`].
fn forking_taken() -> Option<Forking> {
    // SAFETY: called by the forking thread in its after handler (see
    // `ForkingSlot`): no other thread touches the slot.
    unsafe { (*FORKING.0.get()).take() }
}

/// Every lock of this library and of its engine that a thread may hold
/// while another forks, held by the forking thread across `fork` (a lock
/// held by another thread at the fork would stay held for ever in the
/// child, where that thread does not exist). In the order they are taken.
struct Forking {
    /// Making the engine (it allocates and maps under it).
    _making: std::sync::MutexGuard<'static, ()>,
    /// The library's operations (a sweep registers regions, taking the
    /// engine's state, under it).
    _ops: std::sync::MutexGuard<'static, ()>,
    /// The engine's fork guard: its scanner takes it under the engine's
    /// state, and maps and allocates under it. Taking it before the
    /// operations deadlocked: the fork waited for the operations a sweep
    /// held, the sweep for the engine's state the scanner held, the scanner
    /// for the guard.
    _no_pages_out: samepage::ForkHold,
    /// The engine's own mappings (inserting allocates).
    own: samepage::EngineMappingsHold,
    /// The registered ranges (a reader allocates its answer under it).
    live: std::sync::RwLockWriteGuard<'static, BTreeMap<usize, (usize, RegionId)>>,
    /// The engine handed out.
    engine: std::sync::RwLockWriteGuard<'static, Option<&'static Engine>>,
    /// The heap, last: everything above allocates.
    heap: HeapGuard,
}

extern "C" fn before_fork() {
    let making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
    FORK_SINCE.store(monotonic_ns(), Ordering::Release);
    FORK_HOLDS.store(true, Ordering::Release);
    let no_pages_out = samepage::ForkHold::take();
    let own = samepage::EngineMappingsHold::take();
    let live = LIVE.write().unwrap_or_else(|e| e.into_inner());
    let engine = ENGINE.write().unwrap_or_else(|e| e.into_inner());
    let heap = heap::HEAP.lock();
    let forking = Forking { _making: making, _ops: ops, _no_pages_out: no_pages_out, own, live, engine, heap };
    // SAFETY: the forking thread, holding `MAKING` (see `ForkingSlot`).
    unsafe { *FORKING.0.get() = Some(forking) };
}

extern "C" fn after_fork_parent() {
    FORK_HOLDS.store(false, Ordering::Release);
    drop(forking_taken());
}

extern "C" fn after_fork_child() {
    FORK_HOLDS.store(false, Ordering::Release);
    // The parent's registrations, forgotten here (this process gets an
    // engine of its own) but registered again with it.
    let mut inherited: Vec<(usize, usize)> = Vec::new();
    if let Some(mut forking) = forking_taken() {
        // Forgetting frees: the heap first.
        drop(forking.heap);
        forking.own.forget_all();
        inherited = forking.live.iter().map(|(s, (e, _))| (*s, *e)).collect();
        forking.live.clear();
        snapshot::publish(std::iter::empty());
        *forking.engine = None;
    }
    ANY.store(false, Ordering::Release);
    if OWNER.load(Ordering::Acquire) == 0 && !MERGE_ANY.load(Ordering::Acquire) {
        return;
    }
    INSIDE.with(|i| i.set(true));
    // Alone in the child: the merged pages inherited become private copies
    // (no userfaultfd protects them here; a discard must read zeros).
    unmerge_inherited();
    // The parent's agent connection is the parent's.
    let fd = AGENT_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: this process's copy of the connection's fd, which nothing
        // here uses (the agent thread that owned it is not in the child).
        unsafe { libc::close(fd) };
    }
    OWNER.store(0, Ordering::Release);
    INSIDE.with(|i| i.set(false));
    if inherited.is_empty() && !MERGE_ANY.load(Ordering::Acquire) {
        return;
    }
    // A child that execs at once never needs an engine: start after a beat.
    start_in_background(Duration::from_millis(20), inherited);
}

/// Starts this process's engine on a thread of its own (after `delay`),
/// registers `ranges` with it, and starts the sweeper under merge-any.
fn start_in_background(delay: Duration, ranges: Vec<(usize, usize)>) {
    let _ = samepage::spawn_engine_thread("samepage-start", move || {
        INSIDE.with(|i| i.set(true));
        std::thread::sleep(delay);
        let Some(e) = engine() else { return };
        if !ranges.is_empty() {
            let _ops = OPS.lock().unwrap_or_else(|e| e.into_inner());
            for (a, b) in ranges {
                let (parts, _) = mergeable_parts(a, b);
                let _ = register_parts(e, &parts);
            }
        }
        // The starting thread stays on as the sweeper rather than ending:
        // a thread that ends frees what the C library allocated for it
        // (its TLS vector, allocated by the thread that made it: the
        // program's, in the main malloc arena) at a moment of its own, which
        // reorders the program's free lists. Measured: in about one run in
        // three of scripts/workers/compare.py, one of three forked workers
        // whose engine's start thread had ended held ~490 heap pages that
        // differed from the other workers' in 6 bytes each (free-list links
        // in the model's freed chunks), so they could never merge; under
        // ksmd the three heaps are identical.
        if MERGE_ANY.load(Ordering::Acquire) && claim_sweeper() {
            // Named as the sweeper's own thread is (the metrics and the
            // supervisor know the engine's threads by name).
            let _ = rustix::thread::set_name(c"samepage-sweep");
            sweep_loop();
        }
    });
}

/// Replaces every mapping of the pool in this (single-threaded, just
/// forked) process with a private anonymous copy of its content.
fn unmerge_inherited() {
    let Ok(maps) = samepage::maps_in(0, usize::MAX - PAGE) else { return };
    for m in maps.into_iter().filter(|m| m.path.contains("samepage-pool")) {
        let len = m.end - m.start;
        // SAFETY: a fresh mapping where the kernel picks; raw system call.
        let Ok(tmp) = (unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }) else {
            continue;
        };
        // SAFETY: both ranges are mapped and `len` long; no other thread
        // exists in the child to write them meanwhile; then the copy moves
        // over the pool mapping, whose content it holds.
        unsafe { std::ptr::copy_nonoverlapping(m.start as *const u8, tmp.cast::<u8>(), len) };
        // Our fresh copy gets the mapping's protection, then moves over the
        // pool mapping it copies (tagged calls, as the engine's own).
        let tmp = tmp as usize;
        raw(libc::SYS_mprotect, [tmp, len, prot_of(&m.perms).bits() as usize, 0, 0, 0]);
        let fixed = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as usize;
        raw(libc::SYS_mremap, [tmp, len, len, fixed, m.start, 0]);
    }
}

fn prot_of(perms: &str) -> rustix::mm::MprotectFlags {
    use rustix::mm::MprotectFlags as P;
    let b = perms.as_bytes();
    let mut p = P::empty();
    if b.first() == Some(&b'r') {
        p |= P::READ;
    }
    if b.get(1) == Some(&b'w') {
        p |= P::WRITE;
    }
    p
}

extern "C" fn at_load() {
    // `before_fork` takes the engine's fork guard in its own lock order.
    samepage::ForkHold::in_own_handlers();
    // SAFETY: plain functions valid for the life of the process.
    unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child)) };
    // The engine's own mapping changes carry the run's tag past the filter.
    if let Some(tag) = std::env::var(OWN_TAG_ENV).ok().and_then(|t| OwnTag::from_env(&t)) {
        samepage::supervise::set_own_tag(tag);
    }
    if std::env::var_os(MERGE_ANY_ENV).is_some_and(|v| v == "1") && supervised() {
        MERGE_ANY.store(true, Ordering::Release);
        start_in_background(Duration::ZERO, Vec::new());
    }
}

/// Runs [`at_load`] when the library is loaded (before the program's
/// `main`).
#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

#[cfg(test)]
mod tests {
    use super::{arena_heads, outside, PAGE};

    #[test]
    fn the_snapshot_knows_where_nothing_is_registered() {
        use super::snapshot::{may_meet, publish, SNAPSHOT_RANGES};
        publish(std::iter::empty());
        assert!(!may_meet(0, usize::MAX));
        // Neighbours join; a gap between two ranges is free.
        publish([(0x1000, 0x2000), (0x2000, 0x3000), (0x5000, 0x6000)].into_iter());
        assert!(may_meet(0x2fff, 0x4000) && may_meet(0x5fff, 0x7000) && may_meet(0, 0x1001));
        assert!(!may_meet(0x3000, 0x5000) && !may_meet(0, 0x1000) && !may_meet(0x6000, 0x9000));
        // More ranges than it keeps: their bounds stand for them.
        let many = (0..SNAPSHOT_RANGES + 1).map(|i| (0x10000 + i * 0x2000, 0x11000 + i * 0x2000));
        publish(many);
        assert!(may_meet(0x11000, 0x12000), "a gap inside the bounds may meet");
        assert!(!may_meet(0, 0x10000));
        publish(std::iter::empty());
    }

    #[test]
    fn arena_heads_are_the_first_page_of_each_64_mib() {
        const M64: usize = 64 << 20;
        assert_eq!(arena_heads(M64 - PAGE, 2 * M64 + 2 * PAGE), vec![(M64, M64 + PAGE), (2 * M64, 2 * M64 + PAGE)]);
        assert_eq!(arena_heads(M64, M64 + PAGE), vec![(M64, M64 + PAGE)]);
        assert!(arena_heads(M64 + PAGE, 2 * M64).is_empty());
    }

    #[test]
    fn outside_cuts_the_engines_ranges_out_of_a_line() {
        let skip = [(0x1000, 0x2000), (0x5000, 0x7000), (0x9000, 0xa000)];
        assert_eq!(outside(&skip, 0x0, 0x8000), vec![(0x0, 0x1000), (0x2000, 0x5000), (0x7000, 0x8000)]);
        assert_eq!(outside(&skip, 0x5000, 0x7000), vec![]);
        assert_eq!(outside(&skip, 0xb000, 0xc000), vec![(0xb000, 0xc000)]);
        assert_eq!(outside(&[(0x0, 0x3000), (0x1000, 0x2000)], 0x0, 0x4000), vec![(0x3000, 0x4000)]);
    }
}
